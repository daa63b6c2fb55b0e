"""Formats: detection, normalisation, and one test per bad-record rule (file, line and field named)."""

from __future__ import annotations

import json

import pytest

from chattune.data.formats import ReadReport, read_samples, sample_to_record
from chattune.data.schema import Conversation, Pair
from chattune.errors import DataFormatError


def write_jsonl(path, records):
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n"
    )
    return path


def samples(path, **kw):
    return [s for _, s in read_samples(path, **kw)]


GOOD = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def test_detects_each_format(tmp_path):
    cases = {
        "conversations": GOOD,
        "prompt_response": {"prompt": "p", "response": "r"},
        "context_target": {"context": "c", "target": "t"},
        "alpaca": {"instruction": "i", "input": "x", "output": "o", "history": [["q", "a"]]},
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "openai": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    }
    for name, rec in cases.items():
        report = ReadReport()
        got = [s for _, s in read_samples(write_jsonl(tmp_path / f"{name}.jsonl", [rec]), report=report)]
        assert report.formats == {name: 1}
        assert isinstance(got[0], Pair if name in ("prompt_response", "context_target") else Conversation)


def test_alpaca_joins_instruction_and_input_and_keeps_history(tmp_path):
    rec = {
        "instruction": "Translate",
        "input": "chat",
        "output": "cat",
        "system": "S",
        "history": [["q", "a"]],
    }
    (conv,) = samples(write_jsonl(tmp_path / "a.jsonl", [rec]))
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "S"), ("user", "q"), ("assistant", "a"), ("user", "Translate\nchat"), ("assistant", "cat")
    ]  # fmt: skip


def test_tool_message_becomes_call_and_observation(tmp_path):
    rec = {
        "tools": [{"name": "weather"}],
        "conversations": [
            {"role": "user", "content": "Weather?"},
            {"role": "tool", "name": "weather", "parameters": {"city": "Paris"}, "observation": {"temp": 21}},
            {"role": "assistant", "content": "21 degrees."},
        ],
    }
    (conv,) = samples(write_jsonl(tmp_path / "t.jsonl", [rec]))
    call, obs = conv.messages[1], conv.messages[2]
    assert (call.role, call.metadata, call.tool_call.arguments) == ("assistant", "weather", {"city": "Paris"})
    assert (obs.role, obs.content) == ("observation", '{"temp": 21}')
    assert sample_to_record(conv) == {**rec, "conversations": [*rec["conversations"][:1],
        {**rec["conversations"][1], "observation": '{"temp": 21}'}, rec["conversations"][2]]}  # fmt: skip


def test_openai_tool_calls_and_sharegpt_function_call(tmp_path):
    oa = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "assistant", "content": "42"},
        ]
    }  # fmt: skip
    sg = {"conversations": [{"from": "human", "value": "q"},
                            {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
                            {"from": "observation", "value": "42"}, {"from": "gpt", "value": "42"}]}  # fmt: skip
    for rec in (oa, sg):
        (conv,) = samples(write_jsonl(tmp_path / "x.jsonl", [rec]))
        assert [m.role for m in conv.messages] == ["user", "assistant", "observation", "assistant"]
        assert conv.messages[1].tool_call.name == "f" and conv.messages[1].tool_call.arguments == {"x": 1}


def test_json_array_is_streamed_with_item_index(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([GOOD, GOOD, {"conversations": []}], indent=2))
    with pytest.raises(DataFormatError) as e:
        samples(path)
    assert e.value.item == 2 and e.value.field == "conversations" and "empty conversation" in str(e.value)


BAD = [
    ({"conversations": [{"role": "robot", "content": "x"}]}, "conversations[0].role", "unknown role"),
    (
        {"conversations": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                           {"role": "assistant", "content": "a"}]},
        "conversations[1]",
        "system message after a user message",
    ),
    (
        {"conversations": [{"role": "system", "content": "s"}, {"role": "system", "content": "s"},
                           {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "conversations[1]",
        "second system message",
    ),
    ({"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "conversations[0].content", "expected a string"),
    ({"conversations": []}, "conversations", "empty conversation"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": False}]},
     "conversations", "no trainable message"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": "yes"}]},
     "conversations[1].loss", "expected true or false"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "tool", "parameters": {}}]},
     "conversations[1].name", "missing"),
    ({"prompt": "p"}, "response", "missing"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "field", "reason"), BAD)
def test_bad_record_names_file_line_and_field(tmp_path, record, field, reason):
    first = {"prompt": "a", "response": "b"} if "prompt" in record else GOOD
    path = write_jsonl(tmp_path / "bad.jsonl", [first, record])
    with pytest.raises(DataFormatError) as e:
        samples(path)
    err = e.value
    assert (err.file, err.line, err.field) == (str(path), 2, field)
    assert reason in err.reason
    assert str(path) + ":2" in str(err)


def test_broken_json_and_bad_encoding(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [GOOD, '{"conversations": [', GOOD])
    with pytest.raises(DataFormatError, match=r"broken\.jsonl:2: broken JSON"):
        samples(path)
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(json.dumps({"prompt": "你好", "response": "好"}, ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataFormatError, match="not valid UTF-8"):
        samples(gbk)


def test_skip_counts_and_reports_bad_records(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, "{oops", {"conversations": []}, GOOD])
    report = ReadReport()
    got = [s for _, s in read_samples(path, on_bad_record="skip", report=report)]
    assert len(got) == 2 and report.read == 4 and report.skipped == 2
    assert "mixed.jsonl:2" in report.examples[0] and "mixed.jsonl:3" in report.examples[1]


def test_unknown_fields_explain_and_advertisegen_hint(tmp_path):
    with pytest.raises(DataFormatError, match="cannot tell the data format"):
        samples(write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}]))
    with pytest.raises(DataFormatError, match="convert advertise-gen"):
        samples(write_jsonl(tmp_path / "y.jsonl", [{"content": "c", "summary": "s"}]))


# ---------------------------------------------------------------- fields no reader uses are never lost silently


def test_unread_message_fields_are_counted_with_the_first_place_and_a_hint(tmp_path):
    rows = [
        {"id": 1, "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"id": 2, "source": "web", "conversations": [{"role": "user", "content": "q"},
         {"role": "assistant", "content": "a", "lost": False, "weight": 0.5}]},
        {"id": 3, "conversations": [{"role": "user", "content": "q"},
         {"role": "assistant", "content": "a", "lost": True}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = ReadReport()
    assert len(samples(path, report=report)) == 3  # warnings, not errors: every record is still read
    lost = report.unknown_fields["lost"]
    assert lost["count"] == 2 and lost["hint"] == " Did you mean 'loss'?"
    assert lost["first"] == f"{path}:2: field 'conversations[1].lost'"
    assert report.unknown_fields["weight"]["count"] == 1
    assert report.extra_fields == {"id": 3, "source": 1}  # record-level extras: listed, not warned


def test_a_record_field_one_edit_from_a_known_one_is_reported(tmp_path):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tool": []}
    report = ReadReport()
    samples(write_jsonl(tmp_path / "d.jsonl", [rec]), report=report)
    assert report.unknown_fields["tool"]["hint"] == " Did you mean 'tools'?" and not report.extra_fields


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"conversations": [{"role": "user", "content": "q", "weight": 2}, {"role": "assistant", "content": "a"}]},
         "conversations[0].weight"),
        ({"conversations": [{"from": "human", "value": "q", "weight": 1}, {"from": "gpt", "value": "a"}]},
         "conversations[0].weight"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]},
         "messages[1].weight"),
        ({"prompt": "p", "respons": "r", "response": "r"}, "respons"),
    ],
)  # fmt: skip
def test_strict_fields_makes_an_unread_field_an_error(tmp_path, record, field):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataFormatError) as err:
        samples(path, strict_fields=True)
    assert err.value.field == field and err.value.line == 1 and "strict_fields" in err.value.describe()
