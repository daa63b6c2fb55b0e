"""Converters: turn a public dataset's own layout into chattune's canonical JSON lines.

Each converter is a generator registered by name; `run_converter` drives one and writes its records.
"""

from __future__ import annotations

import inspect
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from chattune.data.readers import check_file
from chattune.errors import ChattuneError, ConfigError, DataFormatError
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


def converter_options(kind: str) -> list[str]:
    """The keyword options converter `kind` accepts."""
    params = inspect.signature(CONVERTERS.get(kind)).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def run_converter(kind: str, source: str | Path, output: str | Path, **options: Any) -> ConvertStats:
    """Convert `source` with converter `kind` and write JSON lines to `output` atomically."""
    convert = CONVERTERS.get(kind)
    # Checked here rather than left to a TypeError, so a typo in a CLI option reads as a config problem.
    allowed = converter_options(kind)
    if unknown := sorted(set(options) - set(allowed)):
        known = ", ".join(allowed) or "none"
        raise ConfigError(f"converter '{kind}' has no option {', '.join(unknown)} (options: {known})")
    source, output = Path(source), Path(output)
    check_file(source)
    if output.exists() and (output.is_dir() or output.resolve() == source.resolve()):
        raise ConfigError(
            f"output {output} must be a new file, not {'a folder' if output.is_dir() else 'the input'}"
        )
    stats = ConvertStats()
    # A temp file in the same folder, renamed over the output at the end: readers never see half a file,
    # and an error or Ctrl-C leaves any previous output untouched. os.open with 0o666 honours the umask,
    # unlike tempfile's 0o600.
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:  # a file where a folder should be, no permission, read-only disk
        blocker = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else e.strerror or str(e)
        raise ConfigError(f"cannot write output {output}: {reason}") from None
    try:
        with open(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in convert(source, stats, **options):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                stats.written += 1
            f.flush()
            os.fsync(f.fileno())
        if stats.read == 0:  # an empty input is a wrong path or a failed export, not an empty data set
            raise DataFormatError("holds no records to convert", file=str(source))
        os.replace(tmp, output)
    except OSError as e:  # disk full, or the input vanished or became unreadable midway
        tmp.unlink(missing_ok=True)
        raise ChattuneError(f"converting {source} to {output} failed: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return stats


# Imported last: each module registers itself into CONVERTERS, defined above.
from chattune.data.converters import advertise_gen, csv_mapping, from_formats, tool_alpaca  # noqa: E402, F401

__all__ = ["CONVERTERS", "ConvertStats", "Converter", "converter_options", "run_converter"]
