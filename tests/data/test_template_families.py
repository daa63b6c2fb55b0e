"""The real chat templates of popular model families train correctly (issue 15).

The templates are the originals as the `trl` package ships them (`trl/chat_templates/*.jinja`, a test-only
dependency), put on the small test tokenizer with each family's own tokens added (special where the family's
tokenizer marks them special). For every family, a multi-turn conversation with a system prompt (and a tool
exchange where the family renders tools) must encode so that:

- every assistant reply is trained, after exactly the prompt inference renders for it (`encode_prompt`);
- no prompt text is trained;
- each reply's last trained token is one of the template's stop tokens (the end of turn is learnt).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import pytest
from tests.conftest import build_tokenizer

from chattune.data.schema import Conversation, Message, ToolCall
from chattune.data.templates import IGNORE_INDEX, build_template

trl = pytest.importorskip("trl", reason="the real chat templates come from the trl package (test extra)")
TEMPLATES = Path(trl.__file__).parent / "chat_templates"


class Family(NamedTuple):
    specials: list[str]  # special tokens (the first is padding)
    plain: list[str]  # added tokens the family's tokenizer does not mark special
    eos: str
    bos: str | None = None
    tools: bool = False  # the template renders tool definitions and calls


QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
LLAMA3 = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
COHERE = ["<PAD>", "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>"]
COHERE += ["<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>"]
LFM2 = [
    "<|pad|>",
    "<|startoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
]
LFM2_TOOLS = ["<|tool_list_start|>", "<|tool_list_end|>", "<|tool_response_start|>", "<|tool_response_end|>"]
R1 = ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
PHI3 = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
HARMONY = ["<|endoftext|>", "<|startoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>"]
HARMONY += ["<|return|>", "<|call|>", "<|constrain|>"]

FAMILIES = {
    "qwen2_5": Family(QWEN, QWEN_PLAIN, "<|im_end|>", tools=True),
    "qwen3": Family(QWEN, QWEN_PLAIN, "<|im_end|>", tools=True),
    "qwen3_instruct_2507": Family(QWEN, QWEN_PLAIN, "<|im_end|>", tools=True),
    "qwen3_8": Family(QWEN, QWEN_PLAIN, "<|im_end|>", tools=True),
    "llama3_1": Family(
        [*LLAMA3, "<|eom_id|>", "<|python_tag|>"], [], "<|eot_id|>", "<|begin_of_text|>", True
    ),
    "gemma3": Family(["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], [], "<eos>", "<bos>"),
    "cohere2": Family(COHERE, [], "<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>"),
    "lfm2": Family(LFM2 + LFM2_TOOLS, [], "<|im_end|>", "<|startoftext|>", True),
    "lfm2_2_5": Family(LFM2, ["<think>", "</think>"], "<|im_end|>", "<|startoftext|>", True),
    "deepseek_r1_distill": Family(
        R1, ["<think>", "</think>"], "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>"
    ),
    "phi3_5": Family(PHI3, [], "<|endoftext|>"),
    "gptoss": Family(HARMONY, [], "<|return|>", "<|startoftext|>", True),
}

SYSTEM, QUESTIONS = "Answer briefly.", ["Hello there", "What is the capital of France?", "And of Germany?"]
REPLIES = ["Hi! How can I help?", "Paris.", "Berlin is the capital of Germany."]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip


def family_tokenizer(name: str):
    family = FAMILIES[name]
    source = (TEMPLATES / f"{name}.jinja").read_text()
    tok = build_tokenizer(source, family.specials, eos=family.eos, bos=family.bos)
    tok.add_tokens(family.plain)
    return tok


def chat() -> Conversation:
    messages = [Message("system", SYSTEM)]
    for question, reply in zip(QUESTIONS, REPLIES, strict=True):
        messages += [Message("user", question), Message("assistant", reply)]
    return Conversation(messages)


def tool_chat() -> Conversation:
    call = ToolCall("get_weather", {"city": "Paris"})
    return Conversation(
        [Message("system", SYSTEM), Message("user", "Weather in Paris?"),
         Message("assistant", "", metadata=call.name, tool_call=call),
         Message("observation", "sunny, 21 degrees", tool_name=call.name),
         Message("assistant", "It is sunny in Paris."), Message("user", "Thanks!"),
         Message("assistant", "You are welcome.")],
        TOOLS,
    )  # fmt: skip


def trained_replies(encoded) -> list[tuple[list[int], list[int]]]:
    """(ids before the reply, the reply's ids) for every run of trained tokens in every sample."""
    pairs = []
    for e in encoded:
        i = 0
        while i < len(e.labels):
            if e.labels[i] == IGNORE_INDEX:
                i += 1
                continue
            j = i
            while j < len(e.labels) and e.labels[j] != IGNORE_INDEX:
                j += 1
            pairs.append((e.input_ids[:i], e.input_ids[i:j]))
            i = j
    return pairs


def assert_trains_correctly(name: str, conv: Conversation) -> list:
    tok = family_tokenizer(name)
    template = build_template("hf", tok)
    encoded = template.encode(conv)
    pairs = trained_replies(encoded)
    turns = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    assert len(pairs) == len(turns), [tok.decode(r) for _, r in pairs]
    stops = set(template.stop_token_ids())
    prompt_texts = [m.content for m in conv.messages if m.role in ("system", "user", "observation")]
    for i in turns:
        prompt = template.encode_prompt(Conversation(conv.messages[:i], conv.tools))
        replies = [r for p, r in pairs if p == prompt]
        assert len(replies) == 1, f"{name}: no trained reply after the inference prompt of turn {i}"
        reply = replies[0]
        message = conv.messages[i]
        text = tok.decode(reply)
        if message.tool_call is None:
            assert message.content in text, (name, text)
        else:
            assert "get_weather" in text and "Paris" in text, (name, text)
        assert reply[-1] in stops, f"{name}: turn {i} ends with {tok.decode(reply[-1:])!r}, not a stop token"
        assert not any(p in text for p in prompt_texts), (name, text)  # no prompt text is learnt
    return encoded


@pytest.mark.parametrize("name", FAMILIES)
def test_multi_turn_with_system(name: str) -> None:
    assert_trains_correctly(name, chat())


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.tools])
def test_tool_exchange(name: str) -> None:
    assert_trains_correctly(name, tool_chat())


def test_one_sample_where_the_template_renders_prefixes_stably() -> None:
    # Qwen2.5 writes a conversation as prompt + reply, turn after turn: one sample holds all three replies
    [encoded] = build_template("hf", family_tokenizer("qwen2_5")).encode(chat())
    assert encoded.split is None


@pytest.mark.parametrize(("name", "samples"), [("qwen3", 3), ("gptoss", 3), ("deepseek_r1_distill", 3)])
def test_turns_that_the_whole_rendering_cannot_hold_become_samples(name: str, samples: int) -> None:
    # Qwen3 writes an empty reasoning block only in the last turn, gpt-oss closes the last turn with
    # <|return|> and earlier ones with <|end|>, DeepSeek-R1 opens <think> in the prompt and drops it after
    encoded = build_template("hf", family_tokenizer(name)).encode(chat())
    assert len(encoded) == samples
    count, extra = encoded[0].split
    assert count == samples and extra > 0
    assert [e.split for e in encoded[1:]] == [None] * (samples - 1)


def test_phi3_5_learns_end_not_the_trailing_eos() -> None:
    # Phi-3.5 writes eos only after the last turn: every reply ends at <|end|>, in one sample
    tok = family_tokenizer("phi3_5")
    template = build_template("hf", tok)
    [encoded] = template.encode(chat())
    ends = [tok.decode(r[-1:]) for _, r in trained_replies([encoded])]
    assert ends == ["<|end|>"] * 3
    assert tok.convert_tokens_to_ids("<|end|>") in template.stop_token_ids()


def test_deepseek_r1_reply_closes_the_reasoning_block_the_prompt_opens() -> None:
    tok = family_tokenizer("deepseek_r1_distill")
    template = build_template("hf", tok)
    conv = Conversation([Message("user", "Hi"), Message("assistant", "Hello!")])
    [encoded] = template.encode(conv)
    text = tok.decode(encoded.input_ids)
    assert text.endswith("<｜Assistant｜><think>\n\n</think>\n\nHello!<｜end▁of▁sentence｜>"), text


def test_a_template_without_an_end_token_learns_eos(chatml_tokenizer) -> None:
    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    template = build_template("hf", tok)
    [encoded] = template.encode(Conversation([Message("user", "Hi"), Message("assistant", "Hello")]))
    [(_, reply)] = trained_replies([encoded])
    assert reply[-1] == tok.eos_token_id and tok.decode(reply[:-1]) == "Hello"
    assert template.stop_token_ids() == [tok.eos_token_id]
    assert any("eos" in note for note in template.notes())
