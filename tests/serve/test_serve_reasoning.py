"""A reasoning model end to end (issue 16): data check shows the trace, `infer` writes it apart, `serve` returns it
as `reasoning_content` (whole and streamed). The model is a real Llama with Qwen3's chat template that recites a
reasoning trace and an answer by construction (tests/scripted.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
pytest.importorskip("trl", reason="Qwen3's real chat template comes from the trl package (test extra)")

import openai
from tests.data.test_template_families import family_tokenizer
from tests.scripted import save_scripted_llama

from chattune.data.schema import Conversation, Message
from chattune.infer.engine import Engine, load_engine

KEY = "sk-test-reasoning"
REPLY = [
    "<think>",
    "\nLet me",
    " think",
    " about",
    " it",
    ".\n",
    "</think>",
    "\n\nParis",
    " is",
    " the",
    " answer",
    ".",
]
THOUGHT, ANSWER = "Let me think about it.", "Paris is the answer."
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_scripted_llama(tmp_path_factory.mktemp("qwen3-thinker"), family_tokenizer("qwen3"), REPLY)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return load_engine(str(model_dir))


@pytest.fixture(scope="module")
def client(engine: Engine, serving) -> Iterator[openai.OpenAI]:
    with serving(engine, KEY) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_the_reply_comes_back_with_its_reasoning_apart(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0)
    message = r.choices[0].message
    assert message.content == ANSWER and message.reasoning_content == THOUGHT
    assert r.choices[0].finish_reason == "stop"


def test_the_stream_sends_reasoning_deltas_then_content_deltas(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    kinds = [("reasoning" if getattr(d, "reasoning_content", None) else "content") for d in deltas if
             getattr(d, "reasoning_content", None) or d.content]  # fmt: skip
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning") and kinds.count("reasoning") > 1


def test_a_reply_sent_back_in_history_is_encoded_as_training_would(client, engine):
    history = [*ASK, {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT},
               {"role": "user", "content": "And of Germany?"}]  # fmt: skip
    r = client.chat.completions.create(model="tiny", messages=history, max_tokens=2)
    conv = Conversation([Message("user", ASK[0]["content"]), Message("assistant", ANSWER, reasoning=THOUGHT),
                         Message("user", "And of Germany?")])  # fmt: skip
    assert r.usage.prompt_tokens == len(engine.template.encode_prompt(conv))


def test_data_check_and_infer_show_the_trace(model_dir, tmp_path, run_cli):
    record = {"conversations": [{"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."}]}  # fmt: skip
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "run.yaml").write_text(f"model: {model_dir}\ntrain_file: d.jsonl\n")
    check = run_cli("data", "check", "run.yaml", "-n", "1", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    marked = [line for line in check.stdout.splitlines() if line.endswith("reasoning")]
    assert any("'four'" in line or "four" in line for line in marked), check.stdout
    assert "reasoning tokens" in check.stdout
    masked = run_cli("data", "check", "run.yaml", "train_reasoning=false", "-n", "1", cwd=tmp_path)
    assert "(not trained)" in masked.stdout and all("-100" in line for line in masked.stdout.splitlines()
                                                      if line.endswith("reasoning"))  # fmt: skip

    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n")
    infer = run_cli("infer", "--model", str(model_dir), "--mode", "chat", "--input", "in.jsonl", "-o", "out.jsonl",
                    cwd=tmp_path)  # fmt: skip
    assert infer.returncode == 0, infer.stderr
    [row] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert row["prediction"] == ANSWER and row["reasoning"] == THOUGHT
