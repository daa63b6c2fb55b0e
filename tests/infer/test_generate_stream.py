"""`stream()`: text pieces as generated, then the new token ids; generate's error reaches the consumer."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from chattune.infer.engine import Engine, load_engine
from chattune.infer.generate import Sampling, generate_batch, stream

GREEDY = Sampling(max_new_tokens=6)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir))


def prompt(engine: Engine) -> list[int]:
    return engine.tokenizer.encode("hello there", add_special_tokens=False)


def test_pieces_add_up_to_the_reply_and_tokens_are_kept(engine):
    pieces = stream(engine, prompt(engine), GREEDY)
    assert pieces.tokens is None  # known only once generation has ended
    text = "".join(pieces)
    assert text == generate_batch(engine, [prompt(engine)], GREEDY, batch_size=1)[0]
    stops = engine.template.stop_token_ids()
    tokens = pieces.tokens
    assert tokens and (len(tokens) == GREEDY.max_new_tokens or tokens[-1] in stops)
    kept = tokens[:-1] if tokens[-1] in stops else tokens
    assert engine.tokenizer.decode(kept, skip_special_tokens=True) == text


def test_generate_error_is_raised_in_the_consumer(engine, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.model, "generate", broken)
    pieces = stream(engine, prompt(engine), GREEDY)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(pieces)
    assert pieces.tokens is None


def test_closing_early_cancels_and_waits_for_generation(engine):
    cancel = threading.Event()
    threads_before = set(threading.enumerate())
    pieces = stream(engine, prompt(engine), Sampling(max_new_tokens=200), cancel)
    next(pieces)
    pieces.close()
    assert cancel.is_set()
    assert not [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
