"""`chattune infer` on a file or one prompt: prompts built as training built them, predictions written as JSONL."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.data.formats import read_samples
from chattune.data.schema import Conversation, Message, Pair, Sample
from chattune.data.templates import ParsedReply
from chattune.errors import ConfigError


@dataclass
class Prompt:
    """What the model is asked, the reference answer when the data has one, and a short text for display."""

    sample: Sample
    reference: str | None
    text: str


def as_prompt(sample: Sample, mode: str, system: str | None = None) -> Prompt:
    """The prompt for a sample: generate mode keeps the data's own encoding; chat mode wraps text as a user turn."""
    if mode not in ("generate", "chat"):
        raise ConfigError(f"--mode must be generate or chat, not {mode!r}")
    if isinstance(sample, Pair):
        if mode == "generate":
            return Prompt(Pair(sample.prompt, ""), sample.response or None, sample.prompt)
        msgs = ([Message("system", system)] if system else []) + [Message("user", sample.prompt)]
        return Prompt(Conversation(msgs), sample.response or None, sample.prompt)
    messages = list(sample.messages)
    reference = None
    if messages and messages[-1].role == "assistant":  # the last reply is the reference, not the prompt
        reference = messages.pop().content
    if system and not any(m.role == "system" for m in messages):
        messages.insert(0, Message("system", system))
    users = [m.content for m in messages if m.role == "user"]
    return Prompt(Conversation(messages, sample.tools), reference, users[-1] if users else "")


def prompts_from_file(path: str | Path, mode: str, system: str | None = None) -> list[Prompt]:
    """Every record of a data file as a prompt (any format chattune trains on)."""
    return [as_prompt(sample, mode, system) for _, sample in read_samples_for_inference(path)]


def read_samples_for_inference(path: str | Path) -> list[tuple[Any, Sample]]:
    """Samples of a file; records without an answer are fine here (there is nothing to train on)."""
    return list(read_samples(path, allow_untrained=True))


def write_predictions(prompts: list[Prompt], predictions: list[ParsedReply], output: Path) -> None:
    """One JSON line per input: input, prediction, its reasoning and the reference when there are (atomic)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p, pred in zip(prompts, predictions, strict=True):
            row: dict[str, Any] = {"input": p.text, "prediction": pred.display()}
            if pred.reasoning:
                row["reasoning"] = pred.reasoning
            if p.reference is not None:
                row["reference"] = p.reference
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, output)
