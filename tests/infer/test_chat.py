"""`chattune chat`: history, clear/exit/EOF, token counts, and tool calls answered by hand."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from tests.conftest import PRECISIONS, replies_in

import chattune.infer.chat as chat
from chattune.data.schema import Conversation, Message, ToolCall
from chattune.data.templates import ParsedReply
from chattune.errors import ConfigError
from chattune.infer.engine import Engine, load_engine
from chattune.infer.generate import Sampling

GREEDY = Sampling(max_new_tokens=8)
TOOLS = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]
WEATHER = {"tools": TOOLS, "conversations": [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"}, "observation": "sunny"},
    {"role": "assistant", "content": "Sunny."}]}  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir))


class Recorder:
    """Wraps the engine's template to record every prompt the REPL encodes (the conversation and its ids)."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch):
        self.convs: list[Conversation] = []  # the live object: its messages keep growing after the call
        self.snapshots: list[list[Message]] = []
        self.ids: list[list[int]] = []
        encode = engine.template.encode_prompt

        def recording(conv: Conversation) -> list[int]:
            ids = encode(conv)
            self.convs.append(conv)
            self.snapshots.append(list(conv.messages))
            self.ids.append(ids)
            return ids

        monkeypatch.setattr(engine.template, "encode_prompt", recording)


def run(engine: Engine, typed: str, sampling: Sampling = GREEDY, **kw) -> str:
    """Chat with `typed` as the keyboard; returns what the console showed."""
    screen = io.StringIO()
    chat.run_chat(
        engine, sampling, input_stream=io.StringIO(typed), console=Console(file=screen, width=200), **kw
    )
    return screen.getvalue()


def test_history_grows_turn_by_turn_and_exit_ends(engine, monkeypatch):
    rec = Recorder(engine, monkeypatch)
    shown = run(engine, "hi there\nwhat next?\nexit\nnever sent\n")
    assert len(rec.ids) == 2  # nothing after exit is read
    first, second = rec.ids
    assert second[: len(first)] == first and len(second) > len(first)
    roles = [m.role for m in rec.snapshots[1]]
    assert roles == ["user", "assistant", "user"]
    assert [rec.snapshots[1][0].content, rec.snapshots[1][2].content] == ["hi there", "what next?"]
    # the reply the model gave in turn 1 is part of turn 2's prompt
    reply = rec.snapshots[1][1].content
    assert reply and reply in engine.tokenizer.decode(second[len(first) :])
    assert shown.count(f"tokens: prompt {len(first)} + reply") == 1
    assert shown.count(f"tokens: prompt {len(second)} + reply") == 1
    assert f"of {engine.context_length} context" in shown and "never sent" not in shown


def test_clear_keeps_system_and_eof_ends(engine, monkeypatch):
    rec = Recorder(engine, monkeypatch)
    shown = run(engine, "hi there\nclear\nhello\n", system="Be brief.")
    assert "history cleared" in shown and shown.rstrip().endswith("bye")
    assert [(m.role, m.content) for m in rec.snapshots[1]] == [("system", "Be brief."), ("user", "hello")]
    fresh = Conversation([Message("system", "Be brief."), Message("user", "hello")])
    assert rec.ids[1] == engine.template.encode_prompt(fresh)


def test_end_of_input_and_ctrl_c_quit_cleanly(engine):
    assert "bye" in run(engine, "")

    class CtrlC(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    screen = io.StringIO()
    chat.run_chat(engine, GREEDY, input_stream=CtrlC(), console=Console(file=screen, width=200))
    assert "bye" in screen.getvalue()


@pytest.mark.parametrize(
    "content",
    ['{"name": "get_weather"}', '["get_weather"]', "[{'name': 1}]", "[]"],
    ids=["object", "strings", "json", "empty"],
)
def test_bad_tools_file_names_the_file(engine, tmp_path, content):
    path = tmp_path / "my-tools.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"my-tools\.json"):
        run(engine, "hi\n", tools_file=path)
    with pytest.raises(ConfigError, match=r"missing\.json"):
        chat.load_tools(tmp_path / "missing.json")


def test_raw_template_is_refused():
    raw = Engine(
        model=None, tokenizer=None, template=SimpleNamespace(name="raw"), name="m", has_adapter=False
    )
    with pytest.raises(ConfigError, match="template 'raw'"):
        run(raw, "hi\n")


def test_malformed_call_is_shown_raw_with_a_warning(engine):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>'
    parsed = engine.template.parse_reply(text)
    assert parsed.error
    screen = io.StringIO()
    chat.render_reply(parsed, Console(file=screen, width=200), streamed=False)
    shown = screen.getvalue()
    assert "{city: Paris}" in shown and "warning" in shown and "plain text" in shown
    assert [(m.role, m.content, m.tool_call) for m in chat.reply_messages(parsed)] == [
        ("assistant", text, None)
    ]


def test_tool_call_is_shown_as_name_and_arguments():
    parsed = ParsedReply("", [ToolCall("get_weather", {"city": "Paris", "days": 2})])
    screen = io.StringIO()
    chat.render_reply(parsed, Console(file=screen, width=200))
    assert "tool call: get_weather" in screen.getvalue() and '"city": "Paris"' in screen.getvalue()
    (msg,) = chat.reply_messages(parsed)
    assert (msg.role, msg.metadata, msg.tool_call) == ("assistant", "get_weather", parsed.tool_calls[0])


def canned(monkeypatch: pytest.MonkeyPatch, *replies: str) -> list[object]:
    """Make the model "say" these replies in turn (streamed in two pieces); returns the cancel events seen."""
    queue, cancels = list(replies), []

    def fake_stream(engine, prompt_ids, sampling, cancel=None):
        cancels.append(cancel)
        text = queue.pop(0)
        yield text[:3]
        yield text[3:]

    monkeypatch.setattr(chat, "stream", fake_stream)
    return cancels


def test_each_call_gets_its_observation_then_the_model_answers(engine, monkeypatch):
    two_calls = (
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n</tool_call>'
    )
    canned(monkeypatch, two_calls, "done")
    rec = Recorder(engine, monkeypatch)
    shown = run(engine, "go\nresult a\nresult b\n", tools_file=None)
    assert "observation for a> result a" in shown and "observation for b> result b" in shown
    history = [(m.role, m.tool_call.name if m.tool_call else m.content) for m in rec.convs[-1].messages]
    assert history == [("user", "go"), ("assistant", "a"), ("assistant", "b"), ("observation", "result a"),
                       ("observation", "result b"), ("assistant", "done")]  # fmt: skip


def test_end_of_input_at_the_observation_prompt_quits(engine, monkeypatch):
    canned(monkeypatch, '{"name": "a", "arguments": {}}')
    shown = run(engine, "go\n")
    assert "observation for a>" in shown and shown.rstrip().endswith("bye")


def test_ctrl_c_mid_reply_cancels_generation_and_quits(engine, monkeypatch):
    cancels = []

    def interrupted(engine, prompt_ids, sampling, cancel=None):
        cancels.append(cancel)
        yield "Once upon"
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "stream", interrupted)
    shown = run(engine, "tell me a story\nnever read\n")
    assert "Once upon" in shown and shown.rstrip().endswith("bye") and "never read" not in shown
    assert cancels[0].is_set()  # the generation thread is told to stop at its next token


def test_chatglm3_call_is_parsed_and_the_observation_encoded(chatglm3_tokenizer_model, monkeypatch, tmp_path):
    """ChatGLM3 replies stream with their metadata line; the call and the observation enter the history."""
    import shutil

    from chattune.data.templates import build_template
    from chattune.models.chatglm3_tokenizer import load_chatglm3_tokenizer

    shutil.copy(chatglm3_tokenizer_model, tmp_path / "tokenizer.model")
    tok = load_chatglm3_tokenizer(tmp_path)
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    glm = Engine(
        model=model, tokenizer=tok, template=build_template("chatglm3", tok), name="glm", has_adapter=False
    )
    canned(monkeypatch, "get_weather\n```python\ntool_call(city='Paris')\n```", "\nIt is sunny.")
    rec = Recorder(glm, monkeypatch)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    shown = run(glm, "weather in Paris?\nsunny\n", tools_file=tools)
    assert "tool call: get_weather" in shown and '"city": "Paris"' in shown
    assert "assistant> It is sunny." in shown  # the empty metadata line is not shown as a blank line
    call, observation, answer = rec.convs[-1].messages[1:]
    assert call.tool_call == ToolCall("get_weather", {"city": "Paris"}) and answer.content == "It is sunny."
    # the second prompt is exactly what training would encode for this conversation so far
    so_far = Conversation([Message("user", "weather in Paris?"), call, observation], TOOLS)
    assert rec.ids[1] == glm.template.encode_prompt(so_far)
    assert rec.ids[1][-1] == tok.get_command("<|assistant|>")


@pytest.fixture(scope="module")
def weather_model(tiny_model_dir, tmp_path_factory) -> tuple[Engine, Path]:
    """The tiny model taught by LoRA to call get_weather for Paris, then answer the observation."""
    from chattune.config import build_config
    from chattune.train.run import run_training

    root = tmp_path_factory.mktemp("weather")
    data = root / "weather.jsonl"
    data.write_text((json.dumps(WEATHER) + "\n") * 4)
    tools = root / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    # one thread: tests share the machine, and a tiny model gains nothing from more
    values = dict(model=str(tiny_model_dir), train_file=str(data), output_dir=str(root / "run"), batch_size=1,
                  grad_accum=1, learning_rate=1e-2, lr_scheduler="constant", lora_rank=32, lora_dropout=0.0,
                  max_steps=80, logging_steps=40, save_steps=1000, seed=1, num_threads=1,
                  precision="fp32")  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATTUNE_HOME", str(root / "home"))
        final = run_training(build_config(values), console=Console(file=io.StringIO()))
    engine = load_engine(None, final)
    # it learned both replies, in every precision `auto` may load it in (the test must not hang on luck)
    call = ToolCall("get_weather", {"city": "Paris"})
    asked = [Message("user", "weather in Paris?")]
    observed = [*asked, Message("assistant", "", metadata=call.name, tool_call=call),
                Message("observation", "sunny", tool_name=call.name)]  # fmt: skip
    for precision in PRECISIONS:
        said = replies_in(engine, precision, [Conversation(asked, TOOLS), Conversation(observed, TOOLS)])
        assert said[0].tool_calls == [call] and said[1].content == "Sunny.", (precision, said)
    return engine, tools


def test_tool_call_asks_for_the_observation_and_answers(weather_model, monkeypatch):
    engine, tools = weather_model
    rec = Recorder(engine, monkeypatch)
    shown = run(engine, "weather in Paris?\nsunny\n", Sampling(max_new_tokens=64), tools_file=tools)
    assert "tools: get_weather" in shown
    assert "tool call: get_weather" in shown and '"city": "Paris"' in shown
    assert "observation for get_weather> sunny" in shown
    history = rec.convs[-1].messages
    assert rec.convs[-1].tools == TOOLS
    assert [m.role for m in history] == ["user", "assistant", "observation", "assistant"]
    call, observation, answer = history[1:]
    assert call.tool_call == ToolCall("get_weather", {"city": "Paris"}) and call.metadata == "get_weather"
    assert (observation.content, observation.tool_name) == ("sunny", "get_weather")
    assert answer.tool_call is None and answer.content == "Sunny."
    assert shown.count("tokens: prompt") == 2
