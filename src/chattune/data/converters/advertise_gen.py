"""AdvertiseGen (`{"content", "summary"}` per line, though named .json) → prompt/response or conversations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chattune.data.converters.base import CONVERTERS, ConvertStats
from chattune.data.readers import iter_records
from chattune.errors import ConfigError, DataFormatError

_TARGETS = ("prompt_response", "conversations")


@CONVERTERS.register("advertise-gen")
def convert_advertise_gen(
    source: Path, stats: ConvertStats, *, to: str = "prompt_response"
) -> Iterator[dict[str, Any]]:
    """Each line's content → prompt and summary → response (`to="conversations"`: a user/assistant turn)."""
    if to not in _TARGETS:
        raise ConfigError(f"advertise-gen option to must be one of {', '.join(_TARGETS)}, not {to!r}")
    for item in iter_records(source):
        stats.read += 1
        if isinstance(item, DataFormatError):  # broken JSON or bad UTF-8 on one line: skip that line only
            stats.skip(item)
            continue
        where = {"file": item.file, "line": item.line, "item": item.extra.get("item")}
        if not isinstance(item.value, dict):
            stats.skip(DataFormatError(f"expected a JSON object, got {type(item.value).__name__}", **where))
            continue
        texts = {}
        for key in ("content", "summary"):
            value = item.value.get(key)
            if not isinstance(value, str):
                reason = "missing" if value is None else f"expected a string, got {type(value).__name__}"
                stats.skip(DataFormatError(reason, field=key, **where))
                break
            if not value.strip():  # an empty target would teach the model to answer with nothing
                stats.skip(DataFormatError("empty", field=key, **where))
                break
            texts[key] = value
        else:
            prompt, response = texts["content"], texts["summary"]
            if to == "prompt_response":
                yield {"prompt": prompt, "response": response}
            else:
                yield {
                    "conversations": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": response},
                    ]
                }
