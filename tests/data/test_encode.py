"""Encoding a file: worker processes give exactly the in-process result, in order, with the same errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.data import encode
from chattune.data.schema import Conversation
from chattune.data.templates import Limits, build_template


def _write(path: Path, n: int) -> Path:
    rows = [
        {"conversations": [
            {"role": "system", "content": f"sys {i % 7}"},
            {"role": "user", "content": f"question {i} " + "word " * (i % 13)},
            {"role": "assistant", "content": f"answer {i}"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "more " * (i % 5) + str(i)},
        ]}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_worker_processes_match_in_process_encoding(tmp_path, chatml_tokenizer, monkeypatch):
    data = _write(tmp_path / "d.jsonl", 300)
    template = build_template("hf", chatml_tokenizer, Limits(512, 256, 64))
    serial, _ = encode.encode_file(data, template, chatml_tokenizer, cache_dir=tmp_path / "a")
    monkeypatch.setattr(encode, "PARALLEL_AFTER", 16)
    monkeypatch.setattr(encode, "_CHUNK", 7)  # many chunks, a ragged last one
    monkeypatch.setattr(encode, "available_cores", lambda: 2)
    parallel, stats = encode.encode_file(data, template, chatml_tokenizer, cache_dir=tmp_path / "b")
    assert stats.kept == 300 and parallel["input_ids"] == serial["input_ids"]
    assert parallel["labels"] == serial["labels"]


class _FailsOnSample:
    """A real template that refuses one particular conversation, as a broken chat template would."""

    def __init__(self, inner, bad: str):
        self.inner, self.bad = inner, bad

    def encode(self, sample):
        if isinstance(sample, Conversation) and self.bad in sample.messages[1].content:
            raise ValueError(f"template cannot render {self.bad!r}")
        return self.inner.encode(sample)


def test_a_worker_error_is_raised_as_itself(tmp_path, chatml_tokenizer, monkeypatch):
    data = _write(tmp_path / "d.jsonl", 120)
    template = _FailsOnSample(build_template("hf", chatml_tokenizer, Limits(512, 256, 64)), "question 97 ")
    monkeypatch.setattr(encode, "PARALLEL_AFTER", 16)
    monkeypatch.setattr(encode, "available_cores", lambda: 2)
    samples = (s for _, s in encode.read_samples(data, "auto", "error", encode.ReadReport()))
    with pytest.raises(ValueError, match="question 97"):
        list(encode.encode_chunks(samples, template))
