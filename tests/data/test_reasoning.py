"""Reasoning traces are data (issue 16): read under every name, kept on the way through converters and the label
store, trained (or masked) where the real chat template writes them, refused where it has no place for them,
and split from the answer when generated."""

from __future__ import annotations

import json

import pytest
from tests.data.test_template_families import family_tokenizer, trained_replies

from chattune.data.converters import run_converter
from chattune.data.encode import encode_file
from chattune.data.formats import read_samples, sample_to_record
from chattune.data.schema import Conversation, Message
from chattune.data.templates import IGNORE_INDEX, build_template, split_reasoning
from chattune.errors import DataFormatError

THINK_1, THINK_2 = "Two and two make four.", "Three and three make six."
CHAT = Conversation(
    [Message("user", "What is 2+2?"), Message("assistant", "4.", reasoning=THINK_1),
     Message("user", "And 3+3?"), Message("assistant", "6.", reasoning=THINK_2)]
)  # fmt: skip


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- reading and writing


@pytest.mark.parametrize(
    "record",
    [
        {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]},
        {"conversations": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a", "reasoning_content": "r"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "r"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "reasoning": "r"}]},
    ],
)  # fmt: skip
def test_every_name_and_format_reads_the_trace(tmp_path, record):
    [(_, sample)] = list(read_samples(write(tmp_path / "d.jsonl", [record])))
    assert sample.messages[-1].reasoning == "r" and sample.messages[-1].content == "a"
    # written back in our format, it reads the same
    [(_, again)] = list(read_samples(write(tmp_path / "back.jsonl", [sample_to_record(sample)])))
    assert again == sample


def test_a_tool_call_keeps_the_reasoning_before_it(tmp_path):
    record = {"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "reasoning_content": "ask",
              "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]}, {"role": "tool", "content": "sun"},
              {"role": "assistant", "content": "Sunny."}]}  # fmt: skip
    [(_, sample)] = list(read_samples(write(tmp_path / "d.jsonl", [record])))
    call = sample.messages[1]
    assert call.tool_call is not None and call.reasoning == "ask"
    assert sample_to_record(sample)["conversations"][1]["reasoning"] == "ask"


@pytest.mark.parametrize(
    ("message", "field", "reason"),
    [
        ({"role": "user", "content": "q", "reasoning": "r"}, "conversations[0].reasoning", "only an assistant"),
        ({"role": "assistant", "content": "a", "reasoning": "r", "thinking": "s"}, "conversations[0].thinking",
         "differ"),
        ({"role": "assistant", "content": "a", "reasoning": 3}, "conversations[0].reasoning", "expected a string"),
    ],
)  # fmt: skip
def test_bad_traces_name_their_field(tmp_path, message, field, reason):
    path = write(tmp_path / "d.jsonl", [{"conversations": [message, {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataFormatError) as err:
        list(read_samples(path))
    assert err.value.field == field and reason in str(err.value)


def test_the_openai_converter_and_the_label_store_keep_the_trace(tmp_path):
    from chattune.label.store import LabelStore

    source = write(tmp_path / "openai.jsonl", [{"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a", "reasoning_content": "because"}]}])  # fmt: skip
    converted = tmp_path / "ours.jsonl"
    run_converter("openai", source, converted)
    [(_, sample)] = list(read_samples(converted))
    assert sample.messages[1].reasoning == "because"

    store = LabelStore(tmp_path / "labels.sqlite")
    [record_id] = store.import_file(converted).ids
    store.set_status(record_id, "accepted")
    store.export(tmp_path / "exported.jsonl")
    [(_, exported)] = list(read_samples(tmp_path / "exported.jsonl"))
    assert exported.messages[1].reasoning == "because"


# ---------------------------------------------------------------- training on the real reasoning templates

pytest.importorskip("trl", reason="the real chat templates come from the trl package (test extra)")


def reasoning_texts(tok, encoded) -> list[str]:
    return [
        tok.decode(e.input_ids[a:b])
        for e in encoded
        for a, b in zip(e.reasoning[::2], e.reasoning[1::2], strict=True)
    ]


@pytest.mark.parametrize("name", ["qwen3", "qwen3_8", "deepseek_r1_distill", "gptoss", "lfm2_2_5"])
def test_the_trace_is_trained_with_the_reply(name):
    tok = family_tokenizer(name)
    template = build_template("hf", tok)
    assert template.supports_reasoning()
    encoded = template.encode(CHAT)
    replies = [tok.decode(r) for _, r in trained_replies(encoded)]
    assert len(replies) == 2 and THINK_1 in replies[0] and THINK_2 in replies[1], replies
    assert replies[0].index(THINK_1) < replies[0].index("4.")  # the reasoning comes before the answer
    assert sorted(reasoning_texts(tok, encoded)) == sorted([THINK_1, THINK_2])


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1_distill", "gptoss"])
def test_masking_the_trace_trains_the_answer_and_its_end_only(name):
    tok = family_tokenizer(name)
    template = build_template("hf", tok, train_reasoning=False)
    encoded = template.encode(CHAT)
    learnt = " | ".join(tok.decode(r) for _, r in trained_replies(encoded))
    assert THINK_1 not in learnt and THINK_2 not in learnt and "4." in learnt and "6." in learnt
    for e in encoded:  # the trace is still in the input, as context
        for a, b in zip(e.reasoning[::2], e.reasoning[1::2], strict=True):
            assert e.labels[a:b] == [IGNORE_INDEX] * (b - a)
    ends = [r[-1] for _, r in trained_replies(encoded) if "4." in tok.decode(r) or "6." in tok.decode(r)]
    assert ends and all(end in template.stop_token_ids() for end in ends)


@pytest.mark.parametrize(
    ("name", "kept"), [("qwen3", False), ("deepseek_r1_distill", False), ("qwen3_8", True)]
)
def test_earlier_turns_reasoning_is_in_the_prompt_as_the_template_has_it(name, kept):
    # Qwen3 and DeepSeek-R1 drop earlier turns' reasoning from the prompt; Qwen3.8 keeps it
    tok = family_tokenizer(name)
    template = build_template("hf", tok)
    second = template.encode_prompt(Conversation(CHAT.messages[:3]))
    assert (THINK_1 in tok.decode(second)) is kept
    prompts = [p for p, r in trained_replies(template.encode(CHAT)) if THINK_2 in tok.decode(r)]
    assert prompts == [second]  # the second reply is trained after exactly that prompt


@pytest.mark.parametrize("template_name", ["chatglm3", "raw", "hf"])
def test_a_template_without_a_place_for_reasoning_stops_with_file_line_and_template(
    tmp_path, chatml_tokenizer, template_name
):
    if template_name == "chatglm3":
        pytest.importorskip("sentencepiece")
    path = write(tmp_path / "d.jsonl", [sample_to_record(Conversation(CHAT.messages[:2]))] * 2)
    tok = (
        family_tokenizer("qwen2_5") if template_name == "hf" else chatml_tokenizer
    )  # Qwen2.5 ignores reasoning
    if template_name == "chatglm3":
        from tests.conftest import SHARED

        from chattune.models.chatglm3_tokenizer import load_chatglm3_tokenizer

        model = SHARED / "models" / "chatglm3-tokenizer"
        if not (model / "tokenizer.model").is_file():
            pytest.skip("../shared is absent")
        tok = load_chatglm3_tokenizer(model)
    template = build_template(template_name, tok)
    with pytest.raises(DataFormatError) as err:
        encode_file(path, template, tok, cache_dir=tmp_path / "cache")
    said = err.value.describe()
    assert f"{path}:1" in said and "reasoning" in said and repr(template_name) in said


# ---------------------------------------------------------------- generation: reasoning apart from the answer


@pytest.mark.parametrize(
    ("text", "tags", "expected"),
    [
        ("<think>\nhmm\n</think>\n\nParis.", ("<think>", "</think>", False), ("hmm", "\n\nParis.")),
        ("hmm\n</think>\n\nParis.", ("", "</think>", True), ("hmm", "\n\nParis.")),  # the prompt opened it
        ("<think>\nstill thinking", ("<think>", "</think>", False), ("still thinking", "")),  # out of tokens
        ("Paris.", ("<think>", "</think>", False), ("", "Paris.")),
        ("Paris.", ("", "", False), ("", "Paris.")),  # a template without reasoning
    ],
)
def test_split_reasoning(text, tags, expected):
    assert split_reasoning(text, tags) == expected


def test_mid_stream_text_that_may_become_a_tag_is_held_back():
    tags = ("<think>", "</think>", False)
    assert split_reasoning("<thi", tags, final=False) == ("", "")
    assert split_reasoning("<think>\nhmm\n</th", tags, final=False) == ("hmm", "")
    assert split_reasoning("<think>\nhmm\n</think>\n\nPa", tags, final=False) == ("hmm", "\n\nPa")
