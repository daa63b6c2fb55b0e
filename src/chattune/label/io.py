"""Label files: JSON, JSON lines and CSV read in through the data readers; JSON lines for training written out."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from chattune.data.formats import FORMATS, Where, detect_format, sample_to_record
from chattune.data.readers import iter_csv_records, iter_records
from chattune.data.schema import SourceRecord
from chattune.errors import DataFormatError
from chattune.label.records import EXPORT_FORMATS, STATUSES, ExportReport, LabelStoreError, Record

# ---------------------------------------------------------------- turning files into label rows


def record_to_row(value: Any, where: Where) -> dict[str, Any]:
    """A JSON/CSV record (alpaca, prompt/response, context/target or any chat format) as label fields."""
    if not isinstance(value, dict):
        raise where.error(f"expected a JSON object, got {type(value).__name__}")
    status = value.get("status") if value.get("status") in STATUSES else "pending"
    author = str(value.get("author") or "")
    pairs = [("instruction", "input", "output"), ("prompt", None, "response"), ("context", None, "target")]
    # flat pairs stay instruction records (edited field by field); checked before detect_format, which reads a
    # record that also has chat fields as chat
    for ask, extra, answer in pairs:
        if ask in value and not value.get("history") and not value.get("system"):
            row = {
                "kind": "instruction",
                "instruction": str(value.get(ask) or ""),
                "input": str(value.get(extra) or "") if extra else "",
                "output": str(value.get(answer) or ""),
            }
            if not row["instruction"].strip():
                raise where.error("empty", ask)
            return row | {"status": status, "author": author}
    # any chat format: normalise through the training reader, so what we store is what training reads
    fmt = detect_format(value, where)
    sample = FORMATS.get(fmt)(value, Where(where.record, require_target=False))
    rec = sample_to_record(sample)
    if "conversations" not in rec:
        rec = {"conversations": [{"role": "user", "content": rec["prompt"]}]}
    row = {"kind": "conversation", "messages": rec["conversations"], "status": status, "author": author}
    return row | ({"tools": rec["tools"]} if rec.get("tools") else {})


def _iter_file(path: Path) -> Iterator[SourceRecord | DataFormatError]:
    if path.suffix.lower() == ".csv":
        yield from _iter_csv(path)
    else:
        yield from iter_records(path)


def _iter_csv(path: Path) -> Iterator[SourceRecord]:
    """Rows of a UTF-8 CSV file; any other encoding or a broken row stops the import, naming the line."""
    try:
        yield from iter_csv_records(path)
    except DataFormatError as e:
        raise LabelStoreError(e.describe()) from None


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[str], int]:
    """Parse a JSON/JSONL/CSV file into label rows; returns (rows, error messages, records read)."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl", ".csv"):
        raise LabelStoreError(f"{path.name}: import reads .json, .jsonl or .csv files")
    rows, errors, total = [], [], 0
    for item in _iter_file(path):
        total += 1
        try:
            if isinstance(item, DataFormatError):
                raise item
            rows.append(record_to_row(item.value, Where(item, require_target=False)))
        except DataFormatError as e:
            errors.append(e.describe())
    return rows, errors, total


# ---------------------------------------------------------------- export


def write_export(records: Iterable[Record], path: str | Path, format: str = "conversations") -> ExportReport:
    """Write records as JSON lines `chattune train` reads (conversations, prompt_response, context_target)."""
    if format not in EXPORT_FORMATS:
        raise LabelStoreError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
    path = Path(path)
    report = ExportReport(path=str(path))
    lines = []
    normalise = FORMATS.get(format)
    for rec in records:
        try:
            value = _export_value(rec, format)
            # checked with the training reader, so the file never holds a record training would reject
            normalise(value, Where(SourceRecord(str(path), rec.id, value)))
        except DataFormatError as e:
            report.skipped += 1
            if len(report.reasons) < 5:
                report.reasons.append(f"record {rec.id}: {e.reason}")
            continue
        lines.append(json.dumps(value, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)  # atomic, so a training run never reads a half-written file
    report.written = len(lines)
    return report


def _export_value(rec: Record, format: str) -> dict[str, Any]:
    """The record in an export format; a DataFormatError says why the format cannot hold it."""
    if format == "conversations":
        return {"conversations": rec.to_conversation()} | ({"tools": rec.tools} if rec.tools else {})
    if rec.tools:
        raise DataFormatError(f"it offers tools, which {format} cannot hold; export it as conversations")
    if rec.kind == "instruction":
        prompt, answer = rec.prompt_text(), rec.output
    else:
        turns = [m for m in rec.messages if m.get("role") != "system"]
        if len(turns) != 2 or [m.get("role") for m in turns] != ["user", "assistant"]:
            raise DataFormatError(f"a {len(rec.messages)}-message conversation has no single prompt")
        prompt, answer = turns[0]["content"], turns[1]["content"]
    keys = ("prompt", "response") if format == "prompt_response" else ("context", "target")
    return {keys[0]: prompt, keys[1]: answer}
