"""Bad input, tried hard: every data file, config and converter input becomes exact samples or a named error.

The contract (issue 8): whatever bytes a user hands chattune, reading them either yields samples equal to
what was written, or raises a ChattuneError whose one-paragraph message names the file, the line and the
field — never another exception, a hang, or a silently changed sample.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import reprlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from chattune.config import TrainConfig, build_config, load_config
from chattune.data.converters import run_converter
from chattune.data.formats import ReadReport, read_samples, sample_to_record
from chattune.data.schema import Pair
from chattune.errors import ChattuneError, ConfigError, DataFormatError

# Modest budgets: the whole file must stay well under 40 s on a busy 2-core machine. No example database:
# nothing is written into the repository.
# derandomize: the same examples on every run, so CI's verdict does not depend on the draw (widen
# max_examples locally, or drop derandomize, to hunt for new failures)
_COMMON = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, **_COMMON)
SOME = settings(max_examples=40, **_COMMON)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per hypothesis example (tmp_path is one folder per test, shared by its examples)."""
    with tempfile.TemporaryDirectory(prefix="chattune-props-") as d:
        yield Path(d)


def read_all(path: Path, **kw: Any) -> list[Any]:
    return [s for _, s in read_samples(path, **kw)]


def assert_named(err: BaseException, path: Path, line: int | None = None, field: str | None = None) -> None:
    """A user-facing error whose single paragraph names the file (and line, and field where they apply)."""
    assert isinstance(err, ChattuneError), f"{type(err).__name__}: {err}"
    msg = str(err)
    assert "\n" not in msg and len(msg) < 2000, msg
    assert str(path) in msg, msg
    if line is not None:
        assert f"{path}:{line}" in msg, msg
    if field is not None:
        assert f"field '{field}'" in msg, msg


def outcome(fn: Any, *args: Any, **kw: Any) -> Any:
    """fn's result, or the exception it raised (any type: the test decides what is allowed)."""
    try:
        return fn(*args, **kw)
    except Exception as e:  # catching everything is the point: only ChattuneError may pass
        return e


# ---------------------------------------------------------------- strategies

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
non_strings = (
    st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.lists(json_scalars, max_size=3)
    | (st.dictionaries(st.text(max_size=5), json_scalars, max_size=3))
)
# Text as users have it: any code point but lone surrogates (which a UTF-8 file cannot hold), incl. NUL,
# newlines, U+2028, a BOM character, CJK and emoji.
texts = st.text(
    st.characters(exclude_categories=("Cs",)) | st.sampled_from('\x00\n\r\t\u2028\ufeff"\\你好😀'),
    max_size=40,
)
prompt_records = st.one_of(
    st.fixed_dictionaries({"prompt": texts, "response": texts}),  # valid, most of the time
    st.fixed_dictionaries({"prompt": texts | json_values, "response": texts | json_values}),
    st.fixed_dictionaries({"prompt": texts}, optional={"response": json_values, "x": json_values}),
    json_values,
)


def pair_problem(rec: Any) -> str | bool | None:
    """The reference rule for prompt_response records: False when valid, else the field at fault (None: record)."""
    if not isinstance(rec, dict):
        return None
    for key in ("prompt", "response"):
        if not isinstance(rec.get(key), str):
            return key
    return False


# ---------------------------------------------------------------- data readers


@SOME
@given(records=st.lists(prompt_records, min_size=1, max_size=5), ascii_only=st.booleans())
def test_arbitrary_json_records_become_exact_pairs_or_named_errors(records, ascii_only):
    with scratch() as d:
        path = d / "data.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records), "utf-8")
        got = outcome(read_all, path, format="prompt_response")
        problems = [pair_problem(r) for r in records]
        bad = next((i for i, p in enumerate(problems) if p is not False), None)
        if bad is None:
            assert got == [Pair(r["prompt"], r["response"]) for r in records]
        else:
            assert isinstance(got, DataFormatError), got
            assert_named(got, path, bad + 1, problems[bad])

        # skipping: exactly the valid records, unchanged and in order; every other one counted
        report = ReadReport()
        kept = outcome(read_all, path, format="prompt_response", on_bad_record="skip", report=report)
        assert kept == [
            Pair(r["prompt"], r["response"]) for r, p in zip(records, problems, strict=True) if p is False
        ]
        assert report.skipped == sum(p is not False for p in problems)


roles = (
    st.sampled_from(["system", "user", "assistant", "observation"])
    | st.sampled_from(["bot", ""])
    | non_strings
)
messages = st.fixed_dictionaries(
    {"role": roles, "content": texts | non_strings},
    optional={"loss": st.booleans() | st.none() | non_strings, "metadata": texts | non_strings},
)


def conversation_valid(msgs: list[dict[str, Any]]) -> bool:
    """The reference rules for a `conversations` record without tool calls (see formats.validate_conversation)."""
    if not msgs:
        return False
    seen_user = seen_system = trained = False
    for m in msgs:
        if not isinstance(m["role"], str) or m["role"] not in ("system", "user", "assistant", "observation"):
            return False
        loss = m.get("loss")
        if loss is not None and not isinstance(loss, bool):
            return False
        if not isinstance(m["content"], str):
            return False
        if m.get("metadata") is not None and not isinstance(m["metadata"], str):
            return False
        if m["role"] == "system":
            if seen_user or seen_system:
                return False
            seen_system = True
        seen_user = seen_user or m["role"] == "user"
        trained = trained or (loss if loss is not None else m["role"] == "assistant")
    return trained


def canonical(m: dict[str, Any]) -> dict[str, Any]:
    out = {"role": m["role"], "content": m["content"]}
    if m.get("metadata"):
        out["metadata"] = m["metadata"]
    if m.get("loss") is not None:
        out["loss"] = m["loss"]
    return out


@SOME
@given(msgs=st.lists(messages, max_size=4), array=st.booleans())
def test_conversations_round_trip_exactly_or_name_the_field(msgs, array):
    with scratch() as d:
        path = d / ("data.json" if array else "data.jsonl")
        rec = {"conversations": msgs}
        path.write_text(json.dumps([rec], indent=1) if array else json.dumps(rec) + "\n", "utf-8")
        got = outcome(read_all, path, format="conversations")
        if conversation_valid(msgs):
            assert not isinstance(got, Exception), got
            assert [sample_to_record(s) for s in got] == [{"conversations": [canonical(m) for m in msgs]}]
        else:
            assert isinstance(got, DataFormatError), got
            assert_named(got, path, 1 if not array else None)
            assert "(item 0)" in str(got) if array else True
            assert got.field is not None and got.field.startswith("conversations"), str(got)


@SOME
@given(
    records=st.lists(st.fixed_dictionaries({"prompt": texts, "response": texts}), min_size=1, max_size=4),
    layout=st.sampled_from(["jsonl", "jsonl-crlf", "array", "array-indent"]),
    ascii_only=st.booleans(),
    bom=st.booleans(),
    trailing_blank_lines=st.integers(0, 2),
)
def test_text_is_never_changed(records, layout, ascii_only, bom, trailing_blank_lines):
    """NUL characters, U+2028, emoji (escaped as surrogate pairs), a UTF-8 BOM, CRLF: all read back exactly."""
    if layout.startswith("jsonl"):
        nl = "\r\n" if layout == "jsonl-crlf" else "\n"
        text = "".join(json.dumps(r, ensure_ascii=ascii_only) + nl for r in records)
    else:
        text = json.dumps(records, ensure_ascii=ascii_only, indent=2 if layout == "array-indent" else None)
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8") + b"\n" * trailing_blank_lines
    with scratch() as d:
        path = d / ("data.jsonl" if layout.startswith("jsonl") else "data.json")
        path.write_bytes(data)
        assert read_all(path) == [Pair(r["prompt"], r["response"]) for r in records]


@SOME
@given(
    records=st.lists(st.fixed_dictionaries({"prompt": texts, "response": texts}), min_size=1, max_size=4),
    array=st.booleans(),
    cut=st.floats(0, 1, exclude_max=True),
)
def test_truncated_files_give_a_prefix_or_a_named_error(records, array, cut):
    if array:
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    full = text.encode("utf-8")
    data = full[: int(len(full) * cut)]
    with scratch() as d:
        path = d / "data.json"
        path.write_bytes(data)
        got = outcome(read_all, path)
        expected = [Pair(r["prompt"], r["response"]) for r in records]
        if isinstance(got, list):
            assert got == expected[: len(got)]  # whole records only, never a cut one
            assert len(got) >= data.count(b"\n") - array
        else:
            assert isinstance(got, DataFormatError), got
            if not data.strip():
                assert_named(got, path)  # nothing at all: the file is named as empty
            elif array:
                assert got.line is not None and 1 <= got.line <= data.count(b"\n") + 1
                assert_named(got, path, got.line)
            else:
                assert_named(got, path, data.count(b"\n") + 1)  # the line that was cut


@FEW
@given(
    prompts=st.lists(st.text("你好世界中文数据训练样本", min_size=1, max_size=10), min_size=1, max_size=3),
    good_lines=st.integers(0, 2),
    array=st.booleans(),
)
def test_gbk_files_name_the_first_bad_line(prompts, good_lines, array):
    recs = [{"prompt": "ok", "response": "ok"}] * good_lines + [
        {"prompt": p, "response": "r"} for p in prompts
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    text = "[\n" + ",\n".join(lines) + "\n]\n" if array else "\n".join(lines) + "\n"
    data = text.encode("gbk")
    assume(not _is_utf8(data))  # GBK bytes that happen to be valid UTF-8 cannot be told apart
    first_bad = next(i for i, line in enumerate(text.split("\n"), 1) if not _is_utf8(line.encode("gbk")))
    with scratch() as d:
        path = d / ("gbk.json" if array else "gbk.jsonl")
        path.write_bytes(data)
        err = outcome(read_all, path)
        assert isinstance(err, DataFormatError), err
        assert_named(err, path, first_bad)
        assert "UTF-8" in str(err)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
@pytest.mark.parametrize("array", [False, True])
def test_utf16_and_utf32_are_named(tmp_path, encoding, array):
    recs = [{"prompt": "你好", "response": "hi"}]
    text = json.dumps(recs, ensure_ascii=False) if array else json.dumps(recs[0], ensure_ascii=False) + "\n"
    path = tmp_path / "wide.jsonl"
    path.write_bytes(text.encode(encoding))
    err = outcome(read_all, path)
    assert_named(err, path, 1)
    assert "UTF-16" in str(err) or "UTF-32" in str(err)


@FEW
@given(
    records=st.lists(st.fixed_dictionaries({"prompt": texts, "response": texts}), min_size=1, max_size=4),
    at=st.floats(0, 1, exclude_max=True),
    array=st.booleans(),
)
def test_a_raw_nul_byte_is_an_error_on_its_line(records, at, array):
    """A raw NUL is never valid JSON (an escaped one, \\u0000, is: see test_text_is_never_changed)."""
    if array:
        text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    else:
        text = "".join(json.dumps(r) + "\n" for r in records)
    raw = text.encode("utf-8")
    i = int(len(raw) * at)
    data = raw[:i] + b"\x00" + raw[i:]
    with scratch() as d:
        path = d / ("nul.json" if array else "nul.jsonl")
        path.write_bytes(data)
        err = outcome(read_all, path)
        assert isinstance(err, DataFormatError), err
        assert_named(err, path, data.count(b"\n", 0, i) + 1)


def test_one_megabyte_lines(tmp_path):
    big = "长" * (1 << 20) + "\u2028end"
    rec = {"prompt": big, "response": "x" * (1 << 20)}
    for name, text in [
        ("big.jsonl", json.dumps(rec, ensure_ascii=False) + "\n"),
        ("big.json", json.dumps([rec])),
    ]:
        path = tmp_path / name
        path.write_text(text, "utf-8")
        start = time.perf_counter()
        assert read_all(path) == [Pair(rec["prompt"], rec["response"])]
        assert time.perf_counter() - start < 10
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text(json.dumps(rec) + "\n" + '{"prompt": "' + "a" * (1 << 20) + "\n", "utf-8")
    assert_named(outcome(read_all, garbage), garbage, 2)


DEEP = "[" * 10_000 + "]" * 10_000
DEEP_OBJ = '{"a":' * 10_000 + "1" + "}" * 10_000


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (DEEP, None),
        (DEEP_OBJ, None),
        ('{"prompt": "p", "response": "r", "extra": ' + DEEP + "}", None),
        ('{"prompt": "p", "response": "r", "extra": ' + "[" * 200 + "]" * 200 + "}", "extra" + "[0]" * 128),
        (
            json.dumps(
                {
                    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                    "tools": DEEP,
                }
            ),
            "tools",
        ),
        (
            json.dumps(
                {
                    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                    "tools": "[" * 300 + "]" * 300,
                }
            ),
            None,
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {
                            "role": "assistant",
                            "tool_calls": [{"function": {"name": "f", "arguments": DEEP_OBJ}}],
                        },
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ),
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
    ids=["list", "object", "in-field", "200-levels", "sharegpt-tools", "sharegpt-tools-300", "openai-args"],
)
@pytest.mark.parametrize("array", [False, True])
def test_deeply_nested_values_are_named_errors(tmp_path, line, field, array):
    path = tmp_path / "deep.json"
    path.write_text(("[\n" + line + "\n]" if array else "\n" + line + "\n"), "utf-8")
    start = time.perf_counter()
    err = outcome(read_all, path)
    assert time.perf_counter() - start < 10
    assert isinstance(err, DataFormatError), err
    assert_named(err, path, 2, field)
    assert "nested" in str(err)


# (format, a valid record, the string fields in it) — each field gets a wrong type in turn
RECORDS = [
    (
        "conversations",
        {
            "conversations": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u", "metadata": "m"},
                {"role": "tool", "name": "f", "parameters": {}, "observation": "o"},
                {"role": "assistant", "content": "a"},
            ]
        },
        [
            "conversations[0].role",
            "conversations[0].content",
            "conversations[1].content",
            "conversations[1].metadata",
            "conversations[2].name",
            "conversations[3].content",
        ],
    ),
    (
        "sharegpt",
        {"system": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        ["system", "conversations[0].from", "conversations[0].value", "conversations[1].value"],
    ),
    (
        "openai",
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
                {"role": "tool", "content": "r", "tool_call_id": "c", "name": "f"},
                {"role": "assistant", "content": "a"},
            ]
        },
        [
            "messages[0].role",
            "messages[0].content",
            "messages[1].tool_calls[0].function.name",
            "messages[2].tool_call_id",
            "messages[2].name",
            "messages[3].content",
        ],
    ),
    (
        "alpaca",
        {"instruction": "i", "input": "x", "output": "o", "system": "s"},
        ["instruction", "input", "output", "system"],
    ),
    ("prompt_response", {"prompt": "p", "response": "r"}, ["prompt", "response"]),
    ("context_target", {"context": "c", "target": "t"}, ["context", "target"]),
]
OPTIONAL = {"conversations[1].metadata", "system", "input", "messages[2].tool_call_id", "messages[2].name"}


def _set(obj: Any, path: str, value: Any) -> None:
    keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
    for k in keys[:-1]:
        obj = obj[k]
    obj[keys[-1]] = value


@SOME
@given(
    case=st.sampled_from([(fmt, rec, f) for fmt, rec, fields in RECORDS for f in fields]),
    value=non_strings | st.none(),
    before=st.lists(st.sampled_from(["good", "blank"]), max_size=3),
    auto=st.booleans(),
)
def test_non_strings_where_strings_belong_name_file_line_and_field(case, value, before, auto):
    fmt, rec, field = case
    assume(not (value is None and field in OPTIONAL))  # null is how an optional field is left out
    bad = json.loads(json.dumps(rec))
    _set(bad, field, value)
    lines = [json.dumps(rec) if b == "good" else "" for b in before] + [json.dumps(bad)]
    with scratch() as d:
        path = d / "data.jsonl"
        path.write_text("\n".join(lines) + "\n", "utf-8")
        err = outcome(read_all, path, format="auto" if auto else fmt)
        assert isinstance(err, DataFormatError), err
        assert_named(err, path, len(lines), field)
        assert ("missing" if value is None else "expected") in str(err)


@pytest.mark.parametrize(
    ("text", "line", "field", "reason"),
    [
        ('{"prompt": "a", "response": "b", "response": "c"}', 1, "response", "twice"),
        ('{"conversations": [{"role": "user", "content": "a", "content": "b"}]}', 1, "content", "twice"),
        ('{"prompt": "a\\ud800", "response": "b"}', 1, "prompt", "surrogate"),
        ('{"prompt": "a", "response": "b", "x": {"\\udfff": 1}}', 1, "x", "surrogate"),
        ('{"prompt": 1' + "0" * 5000 + ', "response": "b"}', 1, None, "JSON"),
        ('{"prompt": "a", "response": "b"} {"prompt": "c", "response": "d"}', 1, None, "Extra data"),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"', 2, None, "broken JSON"),
        (
            '[{"prompt": "a", "response": "b"}]\n[{"prompt": "c", "response": "d"}]',
            2,
            None,
            "after the closing",
        ),
        ('[{"prompt": "a", "response": "b"},\n{"prompt": "c" "response": "d"}]', 2, None, "broken JSON"),
        (
            '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
            '"tools": [1]}',
            1,
            "tools[0]",
            "tool definition",
        ),
        (
            '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
            '"tools": 5}',
            1,
            "tools",
            "list",
        ),
        ('{"instruction": "i", "output": "o", "history": 0}', 1, "history", "pairs"),
        ('{"instruction": "i", "output": "o", "history": [["q", 1]]}', 1, "history[0]", "pair"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "tool"}, {"role": "assistant", "content": "a"}]}',
            1,
            "messages[1].content",
            "missing",
        ),
        (
            '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", '
            '"loss": "yes"}]}',
            1,
            "conversations[1].loss",
            "true or false",
        ),
        (
            '{"conversations": [{"role": "' + "x" * 100_000 + '", "content": "q"}]}',
            1,
            "conversations[0].role",
            "role",
        ),
    ],
    ids=[
        "duplicate-key",
        "duplicate-nested",
        "lone-surrogate",
        "surrogate-key",
        "huge-int",
        "two-on-a-line",
        "truncated",
        "second-array",
        "missing-comma",
        "tool-int",
        "tools-int",
        "history-int",
        "history-pair",
        "tool-no-content",
        "loss-string",
        "huge-role",
    ],
)
def test_more_bad_records(tmp_path, text, line, field, reason):
    path = tmp_path / "data.json"  # .json: JSON lines, or an array when it starts with '['

    path.write_text(text + "\n", "utf-8")
    err = outcome(read_all, path)
    assert isinstance(err, DataFormatError), err
    assert_named(err, path, line, field)  # also: a 100 kB role name does not make a 100 kB message
    assert reason in str(err)


def test_valid_surrogate_pairs_and_escaped_nul_are_kept(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "\\ud83d\\ude00\\u0000", "response": "\\u2028"}\n', "utf-8")
    assert read_all(path) == [Pair("😀\x00", "\u2028")]


def test_missing_empty_and_folder_paths(tmp_path):
    for path, needle in [
        (tmp_path / "missing.jsonl", "not found"),
        (tmp_path, "folder"),
        (tmp_path / "empty.jsonl", "no records"),
        (tmp_path / "blank.jsonl", "no records"),
    ]:
        if path.name == "empty.jsonl":
            path.write_bytes(b"")
        if path.name == "blank.jsonl":
            path.write_bytes(b"\xef\xbb\xbf\n \r\n\t\n")
        err = outcome(read_all, path)
        assert_named(err, path)
        assert needle in str(err)


# ---------------------------------------------------------------- configs

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
FIELDS = sorted(TrainConfig.model_fields)


def equivalent(got: Any, given_value: Any) -> bool:
    """Whether a validated value is the one the user wrote (pydantic reads "4" as 4, 2.0 as 2)."""
    if isinstance(given_value, str) and not isinstance(got, str):
        if isinstance(got, bool):
            return given_value.strip().lower() in {
                "true",
                "false",
                "yes",
                "no",
                "on",
                "off",
                "1",
                "0",
                "t",
                "f",
                "y",
                "n",
            }
        with contextlib.suppress(ValueError):
            return math.isclose(float(given_value.replace("_", "")), got)
        return False
    if isinstance(given_value, float) and math.isnan(given_value):
        return isinstance(got, float) and math.isnan(got)
    return got == given_value or (given_value is True and got == "auto")  # resume: true means auto


def quoted(key: str) -> str:
    """A key as messages quote it: repr, shortened past 60 characters (escapes make short keys long)."""
    short = reprlib.Repr()
    short.maxstring = 60
    return short.repr(key)


@SOME
@given(values=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), yaml_values, max_size=5))
def test_config_values_are_kept_or_named(values):
    with scratch() as d:
        path = d / "run.yaml"
        text = yaml.safe_dump(values, allow_unicode=True)
        path.write_text(text, "utf-8")
        got = outcome(load_config, path)
        if isinstance(got, TrainConfig):
            for key, value in values.items():
                assert key in FIELDS
                assert equivalent(getattr(got, key), value), (key, value, getattr(got, key))
        else:
            assert isinstance(got, ConfigError), got
            assert_named(got, path)
            msg = str(got)
            # the key at fault is named
            assert any(f"'{k}'" in msg or quoted(k) in msg or f"{k}:" in msg for k in values), msg
            if unknown := [k for k in values if k not in FIELDS]:
                assert any(f"unknown key {quoted(k)}" in msg for k in unknown) or "more problems" in msg, msg
                assert "line " in msg


@SOME
@given(value=yaml_values.filter(lambda v: not isinstance(v, dict) and v is not None))
def test_a_config_that_is_not_a_mapping(value):
    with scratch() as d:
        path = d / "run.yaml"
        path.write_text(yaml.safe_dump(value), "utf-8")
        err = outcome(load_config, path)
        assert isinstance(err, ConfigError), err
        assert_named(err, path)
        assert "mapping" in str(err)


@SOME
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_as_a_config_load_or_fail_cleanly(data):
    with scratch() as d:
        path = d / "run.yaml"
        path.write_bytes(data)
        got = outcome(load_config, path)
        if not isinstance(got, TrainConfig):
            assert_named(got, path)


@FEW
@given(overrides=st.lists(st.text(max_size=20), max_size=4))
def test_any_command_line_overrides_load_or_fail_cleanly(overrides):
    got = outcome(load_config, None, overrides)
    assert isinstance(got, (TrainConfig, ConfigError)), got
    if isinstance(got, ConfigError):
        assert "\n" not in str(got)


BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
lora_target: [*f, *f]
"""


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("model: x\nepochs: 1\nepochs: 5\n", ["'epochs'", "twice", "lines 2 and 3"]),
        ("model: x\nbatch_size: many\n", ["line 2", "'batch_size'"]),
        ("epochs: yes\n", ["line 1", "'epochs' must be a number"]),
        ("lora_rank: true\n", ["'lora_rank' must be a number"]),
        ("learning_rat: 1\n", ["line 1", "unknown key 'learning_rat'", "Did you mean 'learning_rate'?"]),
        ("template: chatglm\n", ["'template' must be one of", "Did you mean 'chatglm3'?"]),
        ("model: [" + "[" * 2000 + "\n", ["nested too deeply"]),
        ("lora_target: " + "[" * 2000 + "]" * 2000 + "\n", ["nested too deeply"]),
        ("model: a\x00b\n", ["not valid YAML", "line 1"]),
        ("model: x\n  bad: [\n", ["not valid YAML", "line 2"]),
        ("model: " + "x" * 100_000 + "\nbatch_size: " + "y" * 100_000 + "\n", ["'batch_size'", "..."]),
        (BOMB, ["line 7: 'lora_target"]),
        ("\n".join(f"key{i}: 1" for i in range(500)), ["unknown key 'key0'", "more problems"]),
        ('"": 1\n', ["unknown key ''"]),
    ],
    ids=[
        "duplicate",
        "wrong-type",
        "yes-as-number",
        "bool-as-int",
        "unknown-key",
        "literal",
        "deep-flow",
        "deep-value",
        "nul",
        "invalid",
        "huge-values",
        "alias-bomb",
        "many-keys",
        "empty-key",
    ],
)
def test_bad_configs(tmp_path, text, needles):
    path = tmp_path / "run.yaml"
    path.write_text(text, "utf-8")
    start = time.perf_counter()
    err = outcome(load_config, path)
    assert time.perf_counter() - start < 10
    assert_named(err, path)
    for needle in needles:
        assert needle in str(err), str(err)


def test_config_encodings_and_paths(tmp_path):
    for name, data in [
        ("gbk.yaml", "model: 你好\n".encode("gbk")),
        ("u16.yaml", "model: x\n".encode("utf-16")),
    ]:
        (tmp_path / name).write_bytes(data)
        err = outcome(load_config, tmp_path / name)
        assert_named(err, tmp_path / name)
        assert "UTF-8" in str(err)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffmodel: 你好\n".encode())
    assert load_config(bom).model == "你好"
    assert "folder" in str(outcome(load_config, tmp_path))
    assert "not found" in str(outcome(load_config, tmp_path / "missing.yaml"))
    # the command line wins over the file, and its error does not point at the file's line
    (tmp_path / "ok.yaml").write_text("model: x\nbatch_size: 2\n", "utf-8")
    err = outcome(load_config, tmp_path / "ok.yaml", ["batch_size=many"])
    assert isinstance(err, ConfigError) and "line 2" not in str(err) and "'batch_size'" in str(err)
    assert outcome(build_config, {"epochs": [[[]]]}, "web form").__class__ is ConfigError


# ---------------------------------------------------------------- converters

LINE_BREAK = re.compile(r"\r\n|\r|\n")  # how csv (newline="") counts lines
MAPPING = "messages:\n  - role: user\n    content: '{q}'\n  - role: assistant\n    content: 'A: {a}'\n"
cells = st.text(st.characters(exclude_categories=("Cs",)) | st.sampled_from(',"\n\r\x00你'), max_size=12)


@SOME
@given(
    header=st.lists(st.sampled_from(["q", "a", "x"]), min_size=1, max_size=4),
    rows=st.lists(st.lists(cells, max_size=5), max_size=5),
)
def test_csv_rows_convert_exactly_or_are_skipped_by_line(header, rows):
    with scratch() as d:
        mapping = d / "map.yaml"
        mapping.write_text(MAPPING, "utf-8")
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        writer.writerow(header)
        starts = []  # the line each data row starts on (quoted cells may span lines)
        for row in rows:
            starts.append(len(LINE_BREAK.findall(buf.getvalue())) + 1)
            writer.writerow(row)
        src = d / "in.csv"
        src.write_text(buf.getvalue(), "utf-8", newline="")
        out = d / "out.jsonl"
        got = outcome(run_converter, "csv", src, out, mapping=mapping)

        if missing := [c for c in ("q", "a") if c not in header]:
            assert isinstance(got, ConfigError), got
            assert str(src) in str(got) and missing[0] in str(got)
            return
        if any(header.count(c) > 1 for c in ("q", "a")):
            assert_named(got, src, 1)
            return
        real = [
            (line, r) for line, r in zip(starts, rows, strict=True) if r
        ]  # csv writes [] as a blank line: no row
        if not real:
            assert_named(got, src)
            assert "no records" in str(got)
            return
        assert not isinstance(got, Exception), got
        iq, ia = header.index("q"), header.index("a")
        good = [r for _, r in real if len(r) == len(header) and r[iq].strip() and r[ia].strip()]
        expected = [
            {
                "conversations": [
                    {"role": "user", "content": r[iq]},
                    {"role": "assistant", "content": f"A: {r[ia]}"},
                ]
            }
            for r in good
        ]
        assert [json.loads(line) for line in out.read_text("utf-8").split("\n")[:-1]] == expected
        assert (got.read, got.written, got.skipped) == (len(real), len(good), len(real) - len(good))
        bad_lines = [
            line for line, r in real if not (len(r) == len(header) and r[iq].strip() and r[ia].strip())
        ]
        assert [e.split(": ", 1)[0] for e in got.skipped_examples] == [f"{src}:{n}" for n in bad_lines][:5]


@pytest.mark.parametrize(
    ("data", "line", "needle"),
    [
        ("q,a\n1,2\n你好,x\n".encode("gbk"), 3, "UTF-8"),
        ("q,a\n1,2\n".encode("utf-16"), 1, "UTF-16"),
        ("q,a\n1,2\n".encode("utf-16-le"), 1, "UTF-16"),
        (b"", 1, "empty"),
        (b"q,a\n", None, "no records"),
        (b"q,q,a\n1,2,3\n", 1, "more than once"),
    ],
    ids=["gbk", "utf16", "utf16-no-bom", "empty", "header-only", "duplicate-column"],
)
def test_bad_csv_files(tmp_path, data, line, needle):
    (tmp_path / "map.yaml").write_text(MAPPING, "utf-8")
    src = tmp_path / "in.csv"
    src.write_bytes(data)
    err = outcome(run_converter, "csv", src, tmp_path / "out.jsonl", mapping=tmp_path / "map.yaml")
    assert_named(err, src, line)
    assert needle in str(err)
    assert not (tmp_path / "out.jsonl").exists()


def test_csv_long_cells_and_bad_mappings(tmp_path):
    (tmp_path / "map.yaml").write_text(MAPPING, "utf-8")
    src = tmp_path / "in.csv"
    src.write_text("q,a\n" + "长" * ((1 << 20) // 3) + ",b\n", "utf-8")  # 1 MB of UTF-8
    stats = run_converter("csv", src, tmp_path / "out.jsonl", mapping=tmp_path / "map.yaml")
    assert stats.written == 1  # a 1 MB cell is data, not "field larger than field limit"
    record = json.loads((tmp_path / "out.jsonl").read_text("utf-8"))
    assert record["conversations"][0]["content"] == "长" * ((1 << 20) // 3)
    for name, text in [
        ("deep.yaml", "messages: " + "[" * 2000),
        ("bad.yaml", "messages: [\n  - {role: user\n"),
    ]:
        (tmp_path / name).write_text(text, "utf-8")
        err = outcome(run_converter, "csv", src, tmp_path / "o.jsonl", mapping=tmp_path / name)
        assert isinstance(err, ConfigError) and "\n" not in str(err) and name in str(err), err


@SOME
@given(
    records=st.lists(
        json_values | st.fixed_dictionaries({"content": texts, "summary": texts}), min_size=1, max_size=5
    )
)
def test_advertise_gen_converts_exactly_or_skips_by_line(records):
    with scratch() as d:
        src, out = d / "train.json", d / "out.jsonl"
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
        if json.dumps(records[0]).startswith("["):
            return  # a first line starting with '[' makes it a JSON array file: a different test
        got = outcome(run_converter, "advertise-gen", src, out)
        assert not isinstance(got, Exception), got

        def ok(r: Any) -> bool:
            return isinstance(r, dict) and all(
                isinstance(r.get(k), str) and r[k].strip() for k in ("content", "summary")
            )

        expected = [{"prompt": r["content"], "response": r["summary"]} for r in records if ok(r)]
        assert [json.loads(line) for line in out.read_text("utf-8").split("\n")[:-1]] == expected
        assert (got.read, got.skipped) == (len(records), len(records) - len(expected))
        bad = [i + 1 for i, r in enumerate(records) if not ok(r)][:5]
        assert [e.split(": ", 1)[0] for e in got.skipped_examples] == [f"{src}:{n}" for n in bad]


@FEW
@given(
    kind=st.sampled_from(["tool-alpaca", "alpaca", "sharegpt", "openai", "context-target"]),
    data=st.lists(json_values, max_size=4).map(json.dumps)
    | st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)
def test_converters_never_crash_on_arbitrary_json(kind, data):
    with scratch() as d:
        src, out = d / "in.json", d / "out.jsonl"
        src.write_text(data, "utf-8")
        got = outcome(run_converter, kind, src, out)
        if isinstance(got, Exception):
            assert_named(got, src)
            assert not out.exists()
        else:
            assert got.read == got.written + got.skipped or kind == "tool-alpaca"


def test_converter_paths(tmp_path):
    src = tmp_path / "in.json"
    src.write_text('{"content": "c", "summary": "s"}\n', "utf-8")
    err = outcome(run_converter, "advertise-gen", tmp_path, tmp_path / "out.jsonl")
    assert_named(err, tmp_path)
    assert "folder" in str(err)
    err = outcome(run_converter, "advertise-gen", src, src / "sub" / "out.jsonl")
    assert isinstance(err, ConfigError) and "is a file, not a folder" in str(err), err
    (tmp_path / "ta.json").write_text(
        '[{"NLDocumentation": "d", "Instances": [{"input": "i", "output": "o", '
        '"Final Thought": "f", "intermediate_steps": [[["a", "1' + "0" * 5000 + '", "t"], "o"]]}]}]',
        "utf-8",
    )
    stats = run_converter("tool-alpaca", tmp_path / "ta.json", tmp_path / "ta.jsonl")
    assert stats.skipped == 1 and "intermediate_steps[0][0][1]" in stats.skipped_examples[0]
