"""Stream records from `.jsonl` files, `.json` arrays and CSV files, one at a time, with their positions."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chattune.data.schema import SourceRecord
from chattune.errors import DataFormatError

_CHUNK = 1 << 20
_JSON_SPACE = " \t\r\n"
# Deeper JSON is never real training data, and later steps (templates json.dumps tools with indent, which
# recurses in Python) would hit the recursion limit on it: reject it here, naming the line.
MAX_DEPTH = 128
# json escapes of UTF-16 surrogates; a lone one decodes to a str that cannot be written back as UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# csv's default cell limit is 128 KiB; long documents in one cell are real data, not an error.
_CSV_FIELD_LIMIT = 2**31 - 1
_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


class _DuplicateKey(ValueError):
    """A JSON object that names the same key twice (json keeps only the last one, silently)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return obj


_decoder = json.JSONDecoder(object_pairs_hook=_pairs)


def check_file(path: Path, what: str = "file") -> None:
    """Raise a DataFormatError when `path` is missing or not a regular file."""
    if path.is_dir():
        raise DataFormatError(f"is a folder; expected a {what}", file=str(path))
    if not path.is_file():
        raise DataFormatError("file not found", file=str(path))


def sniff_encoding(head: bytes) -> str | None:
    """The name of a non-UTF-8 encoding the first bytes of a file betray (UTF-16/32 by BOM or NULs), or None."""
    for bom, name in _BOMS.items():
        if head.startswith(bom):
            return name
    # ASCII text saved as UTF-16/32 without a BOM has a NUL byte beside each character; a single stray NUL
    # is not an encoding and is reported on its own line by the JSON reader
    if len(head) >= 4 and ((head[1] == 0 and head[3] == 0) or (head[0] == 0 and head[2] == 0)):
        return "UTF-16 or UTF-32"
    return None


def utf16_or_32(path: Path, head: bytes | None = None) -> DataFormatError | None:
    """The error for a file whose first bytes (`head`, read when not given) show UTF-16/32, else None."""
    if head is None:
        with path.open("rb") as f:
            head = f.read(4)
    encoding = sniff_encoding(head)
    if encoding is None:
        return None
    return DataFormatError(f"file is {encoding} encoded; save it as UTF-8", file=str(path), line=1)


def not_utf8(path: Path, decode_error: UnicodeDecodeError | None = None) -> DataFormatError | None:
    """Why `path` is not UTF-8 text, naming the file and line (UTF-16/32 by its first bytes, else the first
    byte that does not decode, GBK's for instance), or None when it is UTF-8."""
    if problem := utf16_or_32(path):
        return problem
    at = bad_utf8_position(path)
    if at is None:
        return None
    reason = f" ({decode_error.reason})" if decode_error is not None else ""
    return DataFormatError(
        f"not valid UTF-8 at byte {at[1]}{reason}; is it GBK? save it as UTF-8", file=str(path), line=at[0]
    )


def bad_utf8_position(path: Path) -> tuple[int, int] | None:
    """(line, byte offset in that line) of the first byte that is not UTF-8, or None if the file is UTF-8."""
    data = path.read_bytes()
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        return data.count(b"\n", 0, at) + 1, at - (data.rfind(b"\n", 0, at) + 1)
    return None


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(4096)
    except OSError as e:
        raise DataFormatError(f"cannot read the file: {e.strerror or e}", file=str(path)) from None


def iter_records(path: str | Path) -> Iterator[SourceRecord | DataFormatError]:
    """Yield each record of a JSON-lines file or JSON array; unreadable records come back as errors.

    Errors are yielded, not raised, so the caller decides between stopping and skipping (`on_bad_record`).
    A `.json` file that starts with `{` is read as JSON lines (AdvertiseGen ships that way); a `.jsonl`
    file is always read as lines.
    """
    path = Path(path)
    check_file(path)
    head = _read_head(path)
    if problem := utf16_or_32(path, head):
        raise problem
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    # A .jsonl file is lines whatever its first record looks like: a first line `[...]` is a bad record
    # on line 1, not the start of an array that swallows the rest of the file.
    if first == b"[" and path.suffix.lower() != ".jsonl":
        yield from _iter_array(path)
    else:
        yield from _iter_lines(path)


def value_problem(value: Any) -> tuple[str, str] | None:
    """(reason, field path) for a decoded value later steps cannot handle (too deep, a lone surrogate), or None."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"JSON nested more than {MAX_DEPTH} levels deep", path
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return "a lone UTF-16 surrogate escape (\\ud800-\\udfff) that is not a character", path
        elif isinstance(v, dict):
            for k, item in v.items():
                if _SURROGATE.search(k):
                    return "a key holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)", path
                stack.append((item, f"{path}.{k}" if path else k, depth + 1))
        elif isinstance(v, list):
            stack += [(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(v)]
    return None


def _needs_walk(text: str) -> bool:
    # Only text with many brackets can be too deep, and only escapes make surrogates: most lines skip the walk.
    return text.count("[") + text.count("{") > MAX_DEPTH or _SURROGATE_ESCAPE.search(text) is not None


def _parse(text: str, path: Path, line: int, start: int = 0, item: int | None = None) -> tuple[Any, int]:
    """Decode one JSON value at `text[start:]`; raise DataFormatError naming line and field when it is unusable.

    json.JSONDecodeError passes through untouched, so the array reader can tell truncation from breakage.
    """
    where: dict[str, Any] = {"file": str(path), "line": line, "item": item}
    try:
        value, end = _decoder.raw_decode(text, start)
    except _DuplicateKey as e:
        raise DataFormatError(
            "appears twice in one object (JSON keeps only the last one)", field=e.key, **where
        ) from None
    except RecursionError:
        raise DataFormatError(f"JSON nested more than {MAX_DEPTH} levels deep", **where) from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataFormatError(f"unreadable JSON value: {e}", **where) from None
    if _needs_walk(text[start:end]) and (problem := value_problem(value)):
        raise DataFormatError(problem[0], field=problem[1] or None, **where)
    return value, end


def _decode_line(raw: bytes, path: Path, lineno: int) -> str | DataFormatError:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        return DataFormatError(
            f"not valid UTF-8 at byte {e.start} (is the file GBK-encoded? convert it to UTF-8)",
            file=str(path),
            line=lineno,
        )


def _iter_lines(path: Path) -> Iterator[SourceRecord | DataFormatError]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            text = _decode_line(raw, path, lineno)
            if isinstance(text, DataFormatError):
                yield text
                continue
            if not text.strip():
                continue
            try:
                start = len(text) - len(text.lstrip(_JSON_SPACE))
                value, end = _parse(text, path, lineno, start)
                if text[end:].strip(_JSON_SPACE):
                    raise DataFormatError(
                        f"broken JSON: Extra data at column {end + 1} (one record per line in .jsonl)",
                        file=str(path),
                        line=lineno,
                    )
                yield SourceRecord(str(path), lineno, value)
            except json.JSONDecodeError as e:
                yield DataFormatError(
                    f"broken JSON: {e.msg} at column {e.colno}", file=str(path), line=lineno
                )
            except DataFormatError as e:
                yield e


def _iter_array(path: Path) -> Iterator[SourceRecord | DataFormatError]:
    """Decode a top-level JSON array item by item, holding only the current item's text in memory."""
    with path.open("r", encoding="utf-8-sig", errors="strict") as f:
        buf, pos, line, item, eof = "", 0, 1, 0, False

        def fill() -> bool:
            nonlocal buf, pos
            # Read at least as much again as is buffered: a huge item is re-parsed O(log n) times, not O(n).
            chunk = f.read(max(_CHUNK, len(buf) - pos))
            buf = buf[pos:] + chunk
            pos = 0
            return bool(chunk)

        def skip(chars: str) -> None:
            nonlocal pos, line, eof
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or eof:
                    return
                eof = not fill()

        try:
            eof = not fill()
            skip(" \t\r\n")
            if buf[pos : pos + 1] != "[":
                raise DataFormatError("expected a JSON array", file=str(path), line=line)
            pos += 1
            while True:
                skip(" \t\r\n")
                if buf[pos : pos + 1] == "]":
                    pos += 1
                    skip(" \t\r\n")
                    if pos < len(buf):  # a second array or stray text would otherwise be dropped unseen
                        yield DataFormatError(
                            "unexpected text after the closing ']' of the array", file=str(path), line=line
                        )
                    return
                while True:
                    try:
                        value, end = _parse(buf, path, line, pos, item)
                        break
                    except json.JSONDecodeError as e:
                        if eof:
                            at = line + buf.count("\n", pos, e.pos)
                            yield DataFormatError(f"broken JSON: {e.msg}", file=str(path), line=at, item=item)
                            return
                        eof = not fill()
                    except DataFormatError as e:
                        # The item is unusable but its extent is unknown: stop rather than guess where the
                        # next one starts.
                        yield e
                        return
                yield SourceRecord(str(path), line, value, {"item": item})
                line += buf.count("\n", pos, end)
                pos, item = end, item + 1
                skip(" \t\r\n")
                if buf[pos : pos + 1] == ",":
                    pos += 1
                elif buf[pos : pos + 1] != "]":
                    yield DataFormatError(
                        "expected ',' or ']' after an array item", file=str(path), line=line
                    )
                    return
        except UnicodeDecodeError:
            at = bad_utf8_position(path)
            yield DataFormatError(
                "not valid UTF-8"
                + (f" at byte {at[1]}" if at else "")
                + " (is the file GBK-encoded? convert it to UTF-8)",
                file=str(path),
                line=at[0] if at else None,
            )


def iter_csv(path: Path, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """Each row of a UTF-8 CSV file (an Excel BOM is fine) with the line it starts on; a blank line is `[]`.

    Another encoding or an unreadable row raises a DataFormatError naming the line.
    """
    file = str(path)
    if problem := utf16_or_32(path):  # which would otherwise read as NUL-ridden text
        raise problem
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    # newline="" lets the csv module keep newlines inside quoted cells; utf-8-sig drops Excel's BOM.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        end = 0
        try:
            for row in reader:
                # a row's first line (end + 1): quoted cells may span several lines
                start, end = end + 1, reader.line_num
                yield start, row
        except csv.Error as e:
            raise DataFormatError(f"unreadable CSV: {e}", file=file, line=reader.line_num) from None
        except UnicodeDecodeError as e:
            # The text layer decodes ahead in blocks, so the reader's line is not the bad byte's: find it.
            raise not_utf8(path, e) or DataFormatError(f"not valid UTF-8 ({e.reason})", file=file) from None


def iter_csv_records(path: Path) -> Iterator[SourceRecord]:
    """Each row of a CSV file after its header as a SourceRecord of {column: cell}, empty cells left out.

    The first line is the header, as for csv.DictReader and the csv converter (a blank one names no columns);
    later blank lines are skipped; an empty file has no records.
    """
    rows = iter_csv(path)
    header = next(rows, (1, []))[1]
    for line, row in rows:
        if not row:  # a blank line holds no row at all
            continue
        # a short row lacks its last cells and a long row's extra cells have no column: both are left out
        yield SourceRecord(str(path), line, {k: v for k, v in zip(header, row, strict=False) if k and v})
