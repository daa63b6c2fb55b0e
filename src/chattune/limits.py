"""Token limits of a run: one definition, with the defaults every command falls back to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Length limits: `max_seq_len` for conversations, source/target limits for input-output data."""

    max_seq_len: int = 2048
    max_source_len: int = 1024
    max_target_len: int = 128

    @classmethod
    def of(cls, cfg: Any) -> Limits:
        """The limits a run config (TrainConfig) sets."""
        return cls(cfg.max_seq_len, cfg.max_source_len, cfg.max_target_len)
