"""`chattune serve`: a real uvicorn on loopback, driven by the official openai client, on the tiny model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

import httpx
import openai
from tests.scripted import save_scripted_llama

from chattune.data.schema import Conversation, Message, ToolCall
from chattune.errors import ConfigError
from chattune.infer.engine import Engine, load_engine
from chattune.serve import ServeLimits, run_server
from chattune.system import is_loopback

KEY = "sk-test-0123456789"
HELLO = [{"role": "user", "content": "Hello! How can I help you today?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]


def client_for(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def post(base: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = content if content is not None else json.dumps(body).encode()
    return httpx.post(f"{base}/v1/chat/completions", content=data, headers=headers, timeout=60)


def assert_openai_error(resp: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    if status is not None:
        assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# The served models recite a script whatever the prompt (tests/scripted.py): what they say is known by
# construction, in any precision, so these tests check the server and not a random model's luck.
REPLY = ["The", " capital", " of", " France", " is", " Paris", "."]
CALL = ["<tool_call>", '\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}', "\n</tool_call>"]


@pytest.fixture(scope="module")
def engine(chatml_tokenizer, tmp_path_factory) -> Engine:
    """Says REPLY over and over and never stops by itself: only the token budget or a stop string ends it."""
    path = save_scripted_llama(tmp_path_factory.mktemp("talker"), chatml_tokenizer, REPLY, forever=True)
    return load_engine(str(path))


@pytest.fixture(scope="module")
def base(engine: Engine, serving) -> Iterator[str]:
    with serving(engine, KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return client_for(base)


# ---------------------------------------------------------------- basics


def test_health_and_models(base, client):
    health = httpx.get(f"{base}/health").json()  # no key needed for liveness
    assert health["status"] == "ok" and health["model"] == "tiny"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    raw = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert raw["object"] == "list" and raw["data"][0]["owned_by"] == "chattune"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_api_key_required(base):
    for key in ("wrong-key", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as err:
            client_for(base, key).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        assert err.value.status_code == 401
    resp = httpx.post(f"{base}/v1/chat/completions", json={"messages": HELLO})
    assert_openai_error(resp, 401)
    assert_openai_error(httpx.get(f"{base}/v1/models", headers={"Authorization": "Basic abc"}), 401)


def test_completion_shape_and_usage(client, engine):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0, seed=1)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.tool_calls is None
    prompt = engine.template.encode_prompt(Conversation([Message("user", HELLO[0]["content"])]))
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 12 and choice.finish_reason == "length"  # it never stops by itself
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.message.content == "".join(REPLY + REPLY[:5])


def test_stream_adds_up_to_the_whole_reply(client):
    kw = {"model": "tiny", "messages": HELLO, "max_tokens": 40, "temperature": 0, "seed": 3}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # really incremental


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("France", "The capital of"),  # a whole token
        ("apit", "The c"),  # inside a token: the text before it still comes back
        ("ce is P", "The capital of Fran"),  # across three tokens
        (".The", "The capital of France is Paris"),  # only where the reply starts again
    ],
)
def test_stop_strings_cut_the_reply(client, stop, expected):
    kw = {"model": "tiny", "messages": HELLO, "max_tokens": 40, "temperature": 0}
    r = client.chat.completions.create(**kw, stop=[stop, "never-generated"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    pieces = list(client.chat.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == expected
    assert [c.choices[0].finish_reason for c in pieces if c.choices][-1] == "stop"


def test_concurrent_requests_are_serialised(client):
    kw = {"model": "tiny", "messages": HELLO, "max_tokens": 30, "temperature": 0}
    results: list[str | None] = [None] * 3

    def ask(i: int) -> None:
        results[i] = client.chat.completions.create(**kw).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0] is not None and results.count(results[0]) == 3


# ---------------------------------------------------------------- errors: 4xx, OpenAI's body, server still up


def _many(n: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(n)]


BAD_REQUESTS = {
    "invalid JSON": b'{"messages": [',
    "body not an object": b"[1, 2]",
    "no messages": {"model": "tiny"},
    "messages not a list": {"messages": "hello"},
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "message not an object": {"messages": ["hi"]},
    "user content missing": {"messages": [{"role": "user"}]},
    "bad tool call arguments": {
        "messages": [
            *HELLO,
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{oops"}}],
            },
        ]
    },
    "image content part": {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
    },
    "max_tokens zero": {"messages": HELLO, "max_tokens": 0},
    "max_tokens negative": {"messages": HELLO, "max_tokens": -5},
    "max_tokens beyond context": {"messages": HELLO, "max_tokens": 100_000},
    "max_completion_tokens beyond context": {"messages": HELLO, "max_completion_tokens": 513},
    "prompt longer than context": {"messages": [{"role": "user", "content": "Paris sunny " * 400}]},
    "too many messages": {"messages": _many(257)},
    "temperature not a number": {"messages": HELLO, "temperature": "hot"},
    "temperature out of range": {"messages": HELLO, "temperature": 5},
    "top_p zero": {"messages": HELLO, "top_p": 0},
    "too many stop strings": {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]},
    "empty stop string": {"messages": HELLO, "stop": [""]},
    "n > 1": {"messages": HELLO, "n": 2},
    "tools not objects": {"messages": HELLO, "tools": ["get_weather"]},
    "second system message": {
        "messages": [{"role": "system", "content": "a"}, *HELLO, {"role": "system", "content": "b"}]
    },
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_a_4xx_with_openai_body(base, case):
    body = BAD_REQUESTS[case]
    resp = post(base, content=body) if isinstance(body, bytes) else post(base, body)
    error = assert_openai_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    if isinstance(body, dict) and body.get("stream") is None:  # the same request streamed fails the same way
        assert_openai_error(post(base, {**body, "stream": True}), 400)


def test_error_details_name_the_problem(base):
    unknown = assert_openai_error(post(base, BAD_REQUESTS["unknown role"]))
    assert "unknown role 'wizard'" in unknown["message"] and unknown["param"] == "messages[0].role"
    long = assert_openai_error(post(base, BAD_REQUESTS["prompt longer than context"]))
    assert long["code"] == "context_length_exceeded" and "512" in long["message"]
    many = assert_openai_error(post(base, BAD_REQUESTS["too many messages"]))
    assert "257" in many["message"]
    temp = assert_openai_error(post(base, BAD_REQUESTS["temperature not a number"]))
    assert temp["param"] == "temperature"
    assert "JSON" in assert_openai_error(post(base, content=BAD_REQUESTS["invalid JSON"]))["message"]


def test_body_too_large_and_unknown_paths(base, client):
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    assert_openai_error(post(base, big), 413)
    headers = {"Authorization": f"Bearer {KEY}"}
    assert_openai_error(httpx.get(f"{base}/v1/nothing", headers=headers), 404)
    assert_openai_error(httpx.get(f"{base}/v1/chat/completions", headers=headers), 405)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    assert err.value.status_code == 400
    # the server survived every bad request above
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3).usage.completion_tokens


def test_smaller_limits_are_honoured(engine, serving):
    limits = ServeLimits(max_body_bytes=2000, max_messages=3, max_pending=1)
    with serving(engine, KEY, limits=limits) as url:
        assert_openai_error(post(url, {"messages": _many(4)}), 400)
        assert_openai_error(post(url, {"messages": [{"role": "user", "content": "x" * 3000}]}), 413)
        assert post(url, {"messages": _many(3), "max_tokens": 2}).status_code == 200
        client = client_for(url)
        with slowed(engine, SLOW):
            stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=300, stream=True)
            next(c for c in stream if c.choices and c.choices[0].delta.content)
            with pytest.raises(openai.RateLimitError):  # one request already holds the only place
                client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
            stream.close()
    with pytest.raises(ConfigError, match="positive"):
        ServeLimits(max_messages=0)


# ---------------------------------------------------------------- concurrency: disconnects free the model


@contextmanager
def slowed(engine: Engine, seconds: float) -> Iterator[list[int]]:
    """Every forward pass (one per generated token) takes `seconds` longer; yields a call counter."""
    calls = [0]

    def hook(*args: Any) -> None:
        calls[0] += 1
        time.sleep(seconds)

    handle = engine.model.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


# Timings below leave wide margins: a slowed generation of 400 tokens takes 20 s, so a second request that
# finishes within 6 s can only have run because the first one stopped, even on a busy machine.
SLOW = 0.05


def test_disconnect_mid_stream_frees_the_model(base, client, engine):
    long = {"model": "tiny", "messages": HELLO, "max_tokens": 400, "temperature": 0}
    with slowed(engine, SLOW) as calls:
        stream = client.chat.completions.create(**long, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the model is generating now
        start = time.monotonic()
        health = httpx.get(f"{base}/health", timeout=5).json()
        took = time.monotonic() - start
        assert took < 2 and health["generating"], (took, health)  # /health answers while the model is busy
        stream.close()
        start = time.monotonic()
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0)
        elapsed = time.monotonic() - start
        assert r.usage.completion_tokens == 5
        assert elapsed < 6, f"second request waited {elapsed:.1f}s: the abandoned stream kept the model"
        assert calls[0] < 250, calls[0]  # the first generation stopped long before its 400 tokens
    assert not httpx.get(f"{base}/health").json()["generating"]


def test_abandoned_non_streamed_request_is_cancelled(base, client, engine):
    body = {"messages": HELLO, "max_tokens": 400, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with slowed(engine, SLOW) as calls:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and hangs up
            httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=1)
        start = time.monotonic()
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0)
        elapsed = time.monotonic() - start
        assert r.usage.completion_tokens == 5 and elapsed < 6, elapsed
        assert calls[0] < 250, calls[0]


# ---------------------------------------------------------------- tool calls, from a model that makes one


@pytest.fixture(scope="module")
def tool_engine(chatml_tokenizer, tmp_path_factory) -> Engine:
    """Answers every prompt with CALL, a get_weather call written as the template writes calls, then stops."""
    path = save_scripted_llama(tmp_path_factory.mktemp("caller"), chatml_tokenizer, CALL)
    return load_engine(str(path))


@pytest.fixture(scope="module")
def tool_client(tool_engine: Engine, serving) -> Iterator[openai.OpenAI]:
    with serving(tool_engine, KEY) as url:
        yield client_for(url)


def test_tool_call_comes_back_in_openai_shape(tool_client, tool_engine):
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": TOOLS}
    r = tool_client.chat.completions.create(**ask, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(tool_client.chat.completions.create(**ask, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert not "".join(d.content or "" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the call and its result sent back: they become the same conversation training data would
    history = [
        *ask["messages"],
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    final = tool_client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=5)
    expected = Conversation(
        [
            Message("user", "weather in Paris?"),
            Message("assistant", "", tool_call=ToolCall("get_weather", {"city": "Paris"})),
            Message("observation", "sunny", tool_name="get_weather"),
        ],
        TOOLS,
    )
    assert final.usage.prompt_tokens == len(tool_engine.template.encode_prompt(expected))


def test_tool_choice_none_leaves_the_call_as_text(tool_client):
    r = tool_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS,
        tool_choice="none", temperature=0,
    )  # fmt: skip
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert "get_weather" in r.choices[0].message.content


# ---------------------------------------------------------------- run_server's exposure rules


def test_run_server_refuses_public_address_without_key(engine, capsys):
    with pytest.raises(ConfigError, match="without an API key"):
        run_server(engine, host="0.0.0.0", port=1)
    assert "warning" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="empty"):
        run_server(engine, host="127.0.0.1", port=1, api_key=" ")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_generation_failure_is_reported_and_the_server_recovers(client, engine, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.model, "generate", broken)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
    assert err.value.status_code == 500 and "out of memory" in err.value.message
    with pytest.raises(openai.APIError, match="out of memory"):
        list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, stream=True))
    monkeypatch.undo()
    assert (
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3).usage.completion_tokens
        == 3
    )
