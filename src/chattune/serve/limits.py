"""The server's limits, checked by the guard (body size), the service (messages, tokens) and the runner."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chattune.errors import ConfigError


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how many may wait for the model."""

    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_pending: int = 64  # admitted requests not yet answered in full; beyond this the server answers 429
    default_max_tokens: int = 512  # when a request gives no max_tokens (cut to what the context leaves)
    disconnect_poll_s: float = 0.25  # how often a non-streamed request checks that its client is still there

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value <= 0:
                raise ConfigError(f"ServeLimits.{name} must be positive, got {value}")
