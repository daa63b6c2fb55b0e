"""alpaca, sharegpt, openai and context-target → conversations, through chattune's own format readers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chattune.data.converters.base import CONVERTERS, MAX_SKIPPED_EXAMPLES, ConvertStats
from chattune.data.formats import ReadReport, read_samples, sample_to_record
from chattune.data.schema import Conversation, Message, Pair

# converter name → the format name chattune.data.formats registers it under
_FORMATS = {
    "alpaca": "alpaca",
    "sharegpt": "sharegpt",
    "openai": "openai",
    "context-target": "context_target",
}


def _convert_format(fmt: str) -> Callable[..., Iterator[dict[str, Any]]]:
    """A converter that reads `fmt` records and writes them as canonical conversations."""

    def convert(source: Path, stats: ConvertStats) -> Iterator[dict[str, Any]]:
        """Each record → canonical conversations; records the format reader rejects are skipped and counted."""
        report = ReadReport()
        try:
            for _, sample in read_samples(source, format=fmt, on_bad_record="skip", report=report):
                if isinstance(sample, Pair):  # input-output data becomes a one-turn chat
                    sample = Conversation(
                        [Message("user", sample.prompt), Message("assistant", sample.response)]
                    )
                yield sample_to_record(sample)
        finally:
            # Copied at the end (also when stopped early) so the counts match what was yielded.
            stats.read += report.read
            stats.skipped += report.skipped
            room = MAX_SKIPPED_EXAMPLES - len(stats.skipped_examples)
            stats.skipped_examples += report.examples[: max(room, 0)]

    return convert


for _name, _fmt in _FORMATS.items():
    CONVERTERS.register(_name)(_convert_format(_fmt))
