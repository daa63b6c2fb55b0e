"""Converters: turn a public dataset's own layout into chattune's canonical JSON lines.

Each converter is a generator registered by name (converters/base.py); `run_converter` drives one and writes
its records.
"""

from __future__ import annotations

import inspect
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from chattune.atomic import atomic_file
from chattune.data.converters import advertise_gen, csv_mapping, from_formats, tool_alpaca
from chattune.data.converters.base import CONVERTERS, MAX_SKIPPED_EXAMPLES, Converter, ConvertStats
from chattune.data.readers import check_file
from chattune.errors import ChattuneError, ConfigError, DataFormatError

__all__ = [
    "CONVERTERS",
    "MAX_SKIPPED_EXAMPLES",
    "ConvertStats",
    "Converter",
    "converter_options",
    "run_converter",
]
# each of these modules registers its converters into CONVERTERS
MODULES = (advertise_gen, csv_mapping, from_formats, tool_alpaca)


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
    # readers never see half a file, and an error or Ctrl-C leaves any previous output untouched
    stack = ExitStack()
    try:
        f = stack.enter_context(atomic_file(output, fsync=True))
    except OSError as e:  # a file where a folder should be, no permission, read-only disk
        blocker = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else e.strerror or str(e)
        raise ConfigError(f"cannot write output {output}: {reason}") from None
    try:
        with stack:
            for record in convert(source, stats, **options):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                stats.written += 1
            if stats.read == 0:  # an empty input is a wrong path or a failed export, not an empty data set
                raise DataFormatError("holds no records to convert", file=str(source))
    except OSError as e:  # disk full, or the input vanished or became unreadable midway
        raise ChattuneError(f"converting {source} to {output} failed: {e.strerror or e}") from None
    return stats
