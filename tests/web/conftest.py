"""Fixtures for the web tests: a tiny model taught to call a tool, so tool mode runs on a real model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"


@pytest.fixture(autouse=True)
def _served_on_loopback():
    """AppTest runs the pages in this process: tell them they are served on loopback (no sign-in), as
    `chattune web` does by default. Tests of the sign-in write the workspace's auth settings instead."""
    from streamlit import config

    before = config.get_option("server.address")
    config.set_option("server.address", LOOPBACK)
    yield
    config.set_option("server.address", before)


TOOL_PROMPT = "What is the weather in Paris?"
TOOL_OBSERVATION = "sunny, 21 degrees"
TOOL_ANSWER = "It is sunny."


def teach_tool_call(base: Path, out: Path, tools: list[dict], rounds: int = 6) -> Path:
    """Overfit `base` on one tool-calling exchange (call, then an answer after the observation); saves to `out`.

    Trains in fp32 in rounds of 50 steps until greedy decoding gives the call and the answer in fp32 and in
    bf16 (what `precision: auto` loads on AMX CPUs and GPUs), so the tests see the same replies anywhere.
    """
    import torch
    from tests.conftest import PRECISIONS, replies_in

    from chattune.data.schema import Conversation, Message, ToolCall
    from chattune.infer.engine import load_engine

    engine = load_engine(str(base), precision="fp32")
    call = ToolCall("get_weather", {"city": "Paris"})
    asked = [Message("user", TOOL_PROMPT)]
    called = [*asked, Message("assistant", "", metadata=call.name, tool_call=call)]
    answered = [
        *called,
        Message("observation", TOOL_OBSERVATION, tool_name=call.name),
        Message("assistant", TOOL_ANSWER),
    ]
    # encoded by chattune's own template, exactly as the playground will prompt it
    batches = [e for m in (called, answered) for e in engine.template.encode(Conversation(m, tools))]
    prompts = [Conversation(asked, tools), Conversation(answered[:-1], tools)]
    model = engine.model
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(rounds):
        model.train()
        for _ in range(50):
            for enc in batches:
                ids = torch.tensor([enc.input_ids])
                loss = model(input_ids=ids, labels=torch.tensor([enc.labels])).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        model.eval()
        said = {p: replies_in(engine, p, prompts) for p in PRECISIONS}
        if all(r[0].tool_calls == [call] and r[1].content == TOOL_ANSWER for r in said.values()):
            break
    else:
        raise AssertionError(f"the tiny model did not learn the tool exchange in {rounds * 50} steps: {said}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    engine.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """The tiny model after learning to call get_weather for TOOL_PROMPT and to answer its observation."""
    from chattune.web.views.playground import DEFAULT_TOOLS

    out = tmp_path_factory.mktemp("tool-model")
    shutil.rmtree(out)
    return teach_tool_call(tiny_model_dir, out, json.loads(DEFAULT_TOOLS))
