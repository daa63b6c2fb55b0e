"""What every converter shares: the registry they join and the counts they keep."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from chattune.errors import ConfigError, DataFormatError
from chattune.registry import Registry

MAX_SKIPPED_EXAMPLES = 5  # enough to see the pattern without flooding the terminal


@dataclass
class ConvertStats:
    """What a conversion did. Converters count `read` and `skipped`; `run_converter` counts `written`."""

    read: int = 0
    written: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # the first few reasons, each naming its line

    def skip(self, error: DataFormatError) -> None:
        """Count one skipped input record, keeping the first few reasons for the user."""
        self.skipped += 1
        if len(self.skipped_examples) < MAX_SKIPPED_EXAMPLES:
            self.skipped_examples.append(error.describe())


class Converter(Protocol):
    """Yields output records from `source`, counting into `stats`; raises DataFormatError for unreadable input."""

    def __call__(self, source: Path, stats: ConvertStats, **options: Any) -> Iterator[dict[str, Any]]: ...


CONVERTERS: Registry[Converter] = Registry("converter", ConfigError)
