"""Any CSV → conversations, one per row, through a YAML mapping of message templates with `{column}` slots."""

from __future__ import annotations

import string
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chattune.data.converters.base import CONVERTERS, ConvertStats
from chattune.data.readers import iter_csv
from chattune.data.schema import ROLES
from chattune.errors import ConfigError, DataFormatError

_MESSAGE_KEYS = {"role", "content", "loss"}


@dataclass
class _Template:
    """A message template pre-split into literal text and column names, so rendering is plain joining."""

    role: str
    parts: list[tuple[str, str | None]]  # (literal, column or None)
    loss: bool | None

    @property
    def columns(self) -> list[str]:
        return [c for _, c in self.parts if c is not None]

    def render(self, row: dict[str, str]) -> str:
        return "".join(lit + (row[col] if col is not None else "") for lit, col in self.parts)


def _parse_template(text: str, where: str) -> list[tuple[str, str | None]]:
    """Split `text` like str.format does (`{{`/`}}` are literal braces) but allow only bare column names.

    str.format_map would read `{a.b}` or `{a[0]}` as attribute/index access on the value; splitting
    here treats the whole name as a column and rejects conversions/format specs with a clear message.
    """
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ConfigError(f"{where}: {e} (write a literal brace as {{{{ or }}}})") from None
    parts: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in pieces:
        if name is not None and (spec or conversion):
            raw = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(
                f"{where}: '{{{raw}}}' — placeholders are bare column names, without ':' or '!'"
            )
        if name == "":
            raise ConfigError(
                f"{where}: empty placeholder '{{}}' — name a column, or write a literal brace as {{{{"
            )
        parts.append((literal, name))
    return parts


def load_mapping(path: Path) -> list[_Template]:
    """Read and check a mapping file: `messages: [{role, content, loss?}, ...]`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"mapping file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read mapping file {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())  # one line, not PyYAML's excerpt
        raise ConfigError(f"mapping file {path} is not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"mapping file {path} is nested too deeply to be a mapping") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
        raise ConfigError(
            f"mapping file {path}: expected `messages:` with a list of {{role, content}} entries"
        )
    if extra := sorted(set(data) - {"messages"}):
        raise ConfigError(
            f"mapping file {path}: unknown key(s) {', '.join(map(str, extra))} (expected: messages)"
        )
    templates = []
    for i, m in enumerate(data["messages"]):
        where = f"mapping file {path}: messages[{i}]"
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: expected {{role, content}}, got {m!r}")
        if extra := sorted(set(m) - _MESSAGE_KEYS):
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(map(str, extra))} (expected: role, content, loss)"
            )
        role, content, loss = m.get("role"), m.get("content"), m.get("loss")
        if role not in ROLES:
            raise ConfigError(f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise ConfigError(f"{where}: content must be a string (quote it in YAML), got {content!r}")
        if loss is not None and not isinstance(loss, bool):
            raise ConfigError(f"{where}: loss must be true or false, got {loss!r}")
        if role == "system" and i > 0:
            raise ConfigError(f"{where}: a system message can only come first")
        templates.append(_Template(role, _parse_template(content, where + ".content"), loss))
    if not any(t.loss if t.loss is not None else t.role == "assistant" for t in templates):
        raise ConfigError(
            f"mapping file {path}: no trained message (add an assistant message, or set loss: true)"
        )
    return templates


def _record(templates: list[_Template], row: dict[str, str]) -> dict[str, Any]:
    messages = []
    for t in templates:
        message: dict[str, Any] = {"role": t.role, "content": t.render(row)}
        if t.loss is not None:
            message["loss"] = t.loss
        messages.append(message)
    return {"conversations": messages}


@CONVERTERS.register("csv")
def convert_csv(
    source: Path, stats: ConvertStats, *, mapping: str | Path | None = None, delimiter: str = ","
) -> Iterator[dict[str, Any]]:
    """Each CSV row → one conversation from the mapping's templates; ragged rows and empty cells are skipped."""
    if mapping is None:
        raise ConfigError("the csv converter needs mapping=PATH, a YAML file of message templates")
    if not (isinstance(delimiter, str) and len(delimiter) == 1):
        raise ConfigError(f"csv option delimiter must be one character, not {delimiter!r}")
    mapping = Path(mapping)
    templates = load_mapping(mapping)
    file = str(source)
    # closing: an error about the header must not leave the file open until the traceback goes
    with closing(iter_csv(source, delimiter)) as rows:
        first = next(rows, None)
        if first is None:
            raise DataFormatError("empty file: expected a header row of column names", file=file, line=1)
        header = first[1]
        used = list(dict.fromkeys(c for t in templates for c in t.columns))
        if missing := [c for c in used if c not in header]:
            raise ConfigError(
                f"mapping file {mapping} uses column(s) {', '.join(missing)} that {file} does not have "
                f"(its columns: {', '.join(header)})"
            )
        if dup := [c for c in used if header.count(c) > 1]:
            raise DataFormatError(
                f"column(s) {', '.join(dup)} appear more than once in the header", file=file, line=1
            )
        index = {c: header.index(c) for c in used}
        for start, row in rows:
            if not row:  # a blank line holds no row at all
                continue
            stats.read += 1
            if len(row) != len(header):
                stats.skip(
                    DataFormatError(
                        f"has {len(row)} cells, the header has {len(header)}", file=file, line=start
                    )
                )
                continue
            if empty := [c for c in used if not row[index[c]].strip()]:
                stats.skip(DataFormatError("empty cell", file=file, line=start, field=empty[0]))
                continue
            yield _record(templates, {c: row[index[c]] for c in used})
