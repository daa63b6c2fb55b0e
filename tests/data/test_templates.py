"""Templates: exact ChatGLM3 ids/labels on the real tokenizer; hf masks on ChatML and Llama-3 templates; raw."""

from __future__ import annotations

import pytest

from chattune.data.schema import Conversation, Message, Pair, ToolCall
from chattune.data.templates import IGNORE_INDEX, Limits, build_template
from chattune.errors import ConfigError

WORKED = Conversation(
    [
        Message("system", "You are a helpful assistant."),
        Message("user", "Hi"),
        Message("assistant", "Hello!"),
        Message("user", "Bye"),
        Message("assistant", "Goodbye."),
    ]
)


@pytest.fixture(scope="module")
def glm_tok(chatglm3_tokenizer_model):
    from chattune.models.chatglm3_tokenizer import load_chatglm3_tokenizer

    return load_chatglm3_tokenizer(chatglm3_tokenizer_model.parent)


def learnt(tok, enc) -> str:
    return tok.decode([t for t in enc.labels if t != IGNORE_INDEX])


def test_chatglm3_worked_example_exact(glm_tok):
    [enc] = build_template("auto", glm_tok).encode(WORKED)
    assert enc.input_ids == [64790, 64792, 64794, 30910, 13, 809, 383, 260, 6483, 9319, 30930, 64795, 30910, 13,
                             8686, 64796, 30910, 13, 13755, 30992, 64795, 30910, 13, 1690, 30911, 64796, 30910, 13,
                             3574, 16232, 30930, 2]  # fmt: skip
    assert enc.labels == [IGNORE_INDEX] * 16 + [30910, 13, 13755, 30992, 64795] + [IGNORE_INDEX] * 5 + [
        30910, 13, 3574, 16232, 30930, 2]  # fmt: skip


def official_reference(tok, conv_json, tools=None, max_len=10**9):
    """The official demo's algorithm, restated independently: masks per message, then shifted by one."""
    import json

    ids, mask = [tok.get_command("[gMASK]"), tok.get_command("sop")], [0, 0]
    convs = list(conv_json)
    if tools is not None:
        prefix = (
            "Answer the following questions as best as you can. You have access to the following tools:\n"
        )
        convs.insert(
            0, {"role": "system", "content": prefix + json.dumps(tools, indent=4, ensure_ascii=False)}
        )
    for c in convs:
        loss = c.get("loss", True) and c["role"] not in ("system", "user")
        if c["role"] == "tool":
            args = ", ".join(f"{k}={v!r}" for k, v in c["parameters"].items())
            t = tok.build_single_message("assistant", c["name"], f"```python\ntool_call({args})\n```")
            ids += t
            mask += [loss] * len(t)
            t = tok.build_single_message("observation", "", c["observation"])
            ids += t
            mask += [0] * len(t)
        else:
            t = tok.build_single_message(c["role"], "", c["content"])
            ids += t
            mask += [loss] * len(t)
    ids.append(tok.eos_token_id)
    mask.append(0)
    labels = [t if m else -100 for t, m in zip(ids, [0, *mask[:-1]], strict=True)]
    return ids[:max_len], labels[:max_len]


def test_chatglm3_tools_observation_loss_false_and_truncation(glm_tok, tmp_path):
    import json

    from chattune.data.formats import read_samples

    tools = [{"name": "get_weather", "description": "天气", "parameters": {"city": {"type": "string"}}}]
    conv = [
        {"role": "system", "content": "你是一个助手"},
        {"role": "user", "content": "巴黎天气怎么样？"},
        {"role": "assistant", "content": "我来查一下。", "loss": False},
        {
            "role": "tool",
            "name": "get_weather",
            "parameters": {"city": "Paris", "days": 2},
            "observation": "晴，21度",
        },
        {"role": "assistant", "content": "巴黎今天晴，21度。"},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"tools": tools, "conversations": conv}, ensure_ascii=False) + "\n")
    ((_, sample),) = list(read_samples(path))
    for max_len in (10**6, 40):
        [enc] = build_template("chatglm3", glm_tok, Limits(max_seq_len=max_len)).encode(sample)
        assert (enc.input_ids, enc.labels) == official_reference(glm_tok, conv, tools, max_len)
        assert enc.truncated == (max_len == 40)
    assert "tool_call(city='Paris', days=2)" in glm_tok.decode(enc.input_ids) or max_len == 40


def test_chatglm3_input_output_pair(glm_tok):
    tpl = build_template("chatglm3", glm_tok, Limits(max_source_len=6, max_target_len=3))
    pair = Pair("类型#上衣*材质#牛仔布*颜色#白色", "简约而不简单的牛仔外套")
    [enc] = tpl.encode(pair)
    src = glm_tok.encode(pair.prompt, add_special_tokens=False)[:4]
    tgt = glm_tok.encode(pair.response, add_special_tokens=False)[:3]
    assert enc.input_ids == [64790, 64792, *src, *tgt, 2]
    assert enc.labels == [IGNORE_INDEX] * 6 + tgt + [2]
    assert enc.truncated
    assert tpl.encode_prompt(pair) == [64790, 64792, *src]


@pytest.mark.parametrize("which", ["chatml_tokenizer", "llama3_tokenizer"])
def test_hf_masks_learn_replies_and_end_of_turn_only(request, which):
    tok = request.getfixturevalue(which)
    tpl = build_template("auto", tok)
    assert tpl.name == "hf"
    [enc] = tpl.encode(WORKED)
    eot = "<|im_end|>" if which == "chatml_tokenizer" else "<|eot_id|>"
    assert learnt(tok, enc) == f"Hello!{eot}Goodbye.{eot}"
    # the full text is exactly the tokenizer's own rendering
    assert (
        enc.input_ids
        == tok(tok.apply_chat_template(_hf(WORKED), tokenize=False), add_special_tokens=False)["input_ids"]
    )
    # the generation prompt is a prefix of the training text up to the reply
    prompt = tpl.encode_prompt(Conversation(WORKED.messages[:4]))
    assert enc.input_ids[: len(prompt)] == prompt
    assert tok.convert_tokens_to_ids(eot) in tpl.stop_token_ids()


def _hf(conv):
    from chattune.data.templates.hf import to_hf_messages

    return to_hf_messages(conv)


def test_hf_respects_loss_flags(chatml_tokenizer):
    conv = Conversation([Message("user", "q"), Message("assistant", "one", loss=False), Message("user", "q"),
                         Message("assistant", "two")])  # fmt: skip
    [enc] = build_template("hf", chatml_tokenizer).encode(conv)
    assert learnt(chatml_tokenizer, enc) == "two<|im_end|>"


def test_hf_tool_call_messages_render(chatml_tokenizer):
    conv = Conversation([Message("user", "q"), Message("assistant", "", tool_call=ToolCall("f", {"x": 1})),
                         Message("observation", "42", tool_name="f"), Message("assistant", "42")])  # fmt: skip
    [enc] = build_template("hf", chatml_tokenizer).encode(conv)
    assert learnt(chatml_tokenizer, enc).endswith("42<|im_end|>")


def test_raw_pair_and_truncation(chatml_tokenizer):
    tpl = build_template("raw", chatml_tokenizer, Limits(max_source_len=3, max_target_len=2))
    [enc] = tpl.encode(Pair("one two three four", "five six seven"))
    n_src = len(enc.input_ids) - 3
    assert n_src == 3 and enc.truncated
    assert enc.labels[:n_src] == [IGNORE_INDEX] * n_src
    assert enc.labels[-1] == chatml_tokenizer.eos_token_id
    with pytest.raises(ConfigError, match="prompt/response"):
        tpl.encode(WORKED)


def test_unknown_template_suggests(chatml_tokenizer):
    with pytest.raises(ConfigError, match="Did you mean 'chatglm3'"):
        build_template("chatglm", chatml_tokenizer)


def test_tools_and_calls_go_into_text_when_the_template_cannot_render_them(chatml_tokenizer):
    tpl = build_template("hf", chatml_tokenizer)
    assert (tpl.native_tools, tpl.native_calls) == (False, False)  # the test ChatML template knows neither
    tools = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]
    conv = Conversation([Message("user", "q"), Message("assistant", "", tool_call=ToolCall("get_weather", {"city": "Paris"})),
                         Message("observation", "sunny", tool_name="get_weather"), Message("assistant", "Sunny.")], tools)  # fmt: skip
    [enc] = tpl.encode(conv)
    text = chatml_tokenizer.decode(enc.input_ids)
    assert "You have access to the following tools" in text and '"get_weather"' in text
    call = learnt(chatml_tokenizer, enc).split("<|im_end|>")[0]
    assert tpl.parse_reply(call).tool_calls == [ToolCall("get_weather", {"city": "Paris"})]
    assert tpl.parse_reply("Sunny.").content == "Sunny."
    bad = tpl.parse_reply("<tool_call>\n{not json}\n</tool_call>")
    assert bad.error and not bad.tool_calls


def test_chatglm3_reply_parsing(glm_tok):
    tpl = build_template("chatglm3", glm_tok)
    assert tpl.parse_reply("\nHello there").content == "Hello there"
    reply = tpl.parse_reply("get_weather\n```python\ntool_call(city='Paris', days=2)\n```")
    assert reply.tool_calls == [ToolCall("get_weather", {"city": "Paris", "days": 2})] and reply.error is None
    bad = tpl.parse_reply("get_weather\n```python\ntool_call(city=os.system('x'))\n```")
    assert bad.error and not bad.tool_calls


def test_direct_rendering_stays_sandboxed_with_quick_lookups(chatml_tokenizer):
    import copy

    from jinja2.exceptions import SecurityError

    tok = copy.deepcopy(chatml_tokenizer)
    # loop properties and read-only str methods take the quick path; the result must equal transformers' own
    tok.chat_template = (
        "{% for m in messages %}{% if loop.first %}[{{ loop.length }}]{% endif %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'].strip().upper() }}<|im_end|>{% if not loop.last %}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}"
    )
    tpl = build_template("hf", tok)
    assert tpl._jinja is not None  # the direct renderer passed its equivalence probe
    conv = Conversation([Message("user", " hi "), Message("assistant", "yo ")])
    assert tpl._render(conv, _hf(conv), False) == tok.apply_chat_template(_hf(conv), tokenize=False)
    # every other lookup meets the same sandbox checks as transformers' own environment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    quick, stock = tpl._jinja.plain.environment, _compile_jinja_template(tok.chat_template).environment
    assert quick is not stock and stock.getattr.__func__ is type(stock).getattr  # stock left untouched

    def outcome(env, source):
        try:
            return env.from_string(source).render(messages=[{"role": "user"}])
        except SecurityError as e:
            return type(e)

    for source in (
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.format.__globals__ }}",
        "{{ 'a{0}'.format(messages.__class__) }}",
        "{{ messages.append(1) }}{{ messages }}",
        "{% for m in messages %}{{ loop.__class__ }}{{ loop.cycle.__self__ }}{% endfor %}",
    ):
        assert outcome(quick, source) == outcome(stock, source), source
    assert outcome(quick, "{{ messages.append(1) }}") is SecurityError
