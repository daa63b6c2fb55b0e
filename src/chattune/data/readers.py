"""Stream JSON records from `.jsonl` files and `.json` arrays, one at a time, with their positions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from chattune.data.schema import SourceRecord
from chattune.errors import DataFormatError

_CHUNK = 1 << 20
_decoder = json.JSONDecoder()


def iter_records(path: str | Path) -> Iterator[SourceRecord | DataFormatError]:
    """Yield each record of a JSON-lines file or JSON array; unreadable records come back as errors.

    Errors are yielded, not raised, so the caller decides between stopping and skipping (`on_bad_record`).
    A `.json` file that starts with `{` is read as JSON lines (AdvertiseGen ships that way).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError("file not found", file=str(path))
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataFormatError("file is UTF-16 encoded; save it as UTF-8", file=str(path))
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        yield from _iter_array(path)
    else:
        yield from _iter_lines(path)


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
                yield SourceRecord(str(path), lineno, json.loads(text))
            except json.JSONDecodeError as e:
                yield DataFormatError(
                    f"broken JSON: {e.msg} at column {e.colno}", file=str(path), line=lineno
                )
            except RecursionError:
                yield DataFormatError("JSON nested too deeply", file=str(path), line=lineno)


def _iter_array(path: Path) -> Iterator[SourceRecord | DataFormatError]:
    """Decode a top-level JSON array item by item, holding only the current item's text in memory."""
    with path.open("r", encoding="utf-8-sig", errors="strict") as f:
        buf, pos, line, item, eof = "", 0, 1, 0, False

        def fill() -> bool:
            nonlocal buf, pos
            chunk = f.read(_CHUNK)
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
                    return
                while True:
                    try:
                        value, end = _decoder.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as e:
                        if eof:
                            yield DataFormatError(
                                f"broken JSON: {e.msg}", file=str(path), line=line, item=item
                            )
                            return
                        eof = not fill()
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
        except UnicodeDecodeError as e:
            yield DataFormatError(
                f"not valid UTF-8 (is the file GBK-encoded? convert it to UTF-8): {e.reason}", file=str(path)
            )
        except RecursionError:
            yield DataFormatError("JSON nested too deeply", file=str(path), line=line, item=item)
