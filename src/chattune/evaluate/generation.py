"""Generation for evaluation, as a library: eval items from samples, replies generated in batches with a
progress bar, and the scores of those replies. `chattune eval` (evaluate/run.py) and the training recipe's
eval-time generation metrics both use it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from chattune.data.schema import Conversation, Message, Pair, Sample, ToolCall
from chattune.data.templates import ParsedReply
from chattune.errors import ConfigError
from chattune.evaluate.metrics import Row, evaluate_predictions
from chattune.infer.batch import Prompt, as_prompt, read_samples_for_inference
from chattune.infer.generate import Sampling, generate_batch

if TYPE_CHECKING:
    from torch.nn import Module
    from transformers import PreTrainedTokenizerBase


class EngineLike(Protocol):
    """What generation needs: a model, its tokenizer and the template it was trained with (e.g. an `Engine`)."""

    model: Module
    tokenizer: PreTrainedTokenizerBase
    template: Any


@dataclass
class EvalItem:
    """One prompt to answer and what the answer is scored against (text, or tool calls)."""

    prompt: Prompt
    reference_calls: list[ToolCall] | None = None


# ---------------------------------------------------------------- prompts and references


def _calls_json(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [{"name": c.name, "arguments": c.arguments} for c in calls]


def eval_items(
    sample: Sample, mode: str = "generate", system: str | None = None, turns: str = "all"
) -> list[EvalItem]:
    """The prompts a sample is scored on: every trained assistant turn (turns=all), or the final one (last).

    Each prompt is the conversation so far and its reference the next reply, as the ChatGLM3 demo evaluates.
    """
    if turns not in ("all", "last"):
        raise ConfigError(f"turns must be all or last, not {turns!r}")
    if isinstance(sample, Pair):
        return [EvalItem(as_prompt(sample, mode, system))]
    msgs, items, i = sample.messages, [], 0
    while i < len(msgs):
        if msgs[i].role != "assistant":
            i += 1
            continue
        j = i + 1
        if msgs[i].tool_call is not None:  # consecutive calls are one parallel-call reply
            while j < len(msgs) and msgs[j].role == "assistant" and msgs[j].tool_call is not None:
                j += 1
        group = msgs[i:j]
        if i > 0 and any(m.trained for m in group):  # loss: false turns are context, not answers to score
            calls = [m.tool_call for m in group if m.tool_call is not None]
            reference = ParsedReply(group[0].content, calls).display() if calls else group[0].content
            # as_prompt takes a final assistant message as the reference, so hand it the reply as one message
            conv = Conversation([*msgs[:i], Message("assistant", reference)], sample.tools)
            items.append(EvalItem(as_prompt(conv, mode, system), calls or None))
        i = j
    return items[-1:] if turns == "last" else items


def items_from_file(
    path: str | Path,
    mode: str = "generate",
    system: str | None = None,
    turns: str = "all",
    limit: int | None = None,
) -> list[EvalItem]:
    """Every scored prompt of a data file (any format chattune trains on), the first `limit` when given."""
    items = [item for _, s in read_samples_for_inference(path) for item in eval_items(s, mode, system, turns)]
    if not items:
        raise ConfigError(f"{path} has no samples to evaluate")
    return items[:limit] if limit is not None else items


def has_reference(item: EvalItem) -> bool:
    """Whether an item has something to score against (a reference answer or reference tool calls)."""
    return item.reference_calls is not None or item.prompt.reference is not None


# ---------------------------------------------------------------- generation


def generate_rows(
    engine: EngineLike,
    items: Sequence[EvalItem],
    sampling: Sampling,
    batch_size: int = 8,
    progress: Callable[[int], Any] | None = None,
) -> list[Row]:
    """Rows `{input, reference, prediction, [tool fields]}` for `evaluate_predictions`, in input order."""
    ids = [engine.template.encode_prompt(item.prompt.sample) for item in items]
    raw = generate_batch(engine, ids, sampling, batch_size, progress)  # type: ignore[arg-type]
    rows = []
    for item, text in zip(items, raw, strict=True):
        parsed = engine.template.parse_reply(text)
        row: Row = {
            "input": item.prompt.text,
            "reference": item.prompt.reference,
            "prediction": parsed.display(),
        }
        if item.reference_calls is not None:
            row["reference_tool_calls"] = _calls_json(item.reference_calls)
        if parsed.tool_calls or parsed.error:
            row["prediction_tool_calls"] = _calls_json(parsed.tool_calls)
            row["prediction_error"] = parsed.error
        rows.append(row)
    return rows


def generate_with_bar(
    engine: EngineLike,
    items: Sequence[EvalItem],
    sampling: Sampling,
    batch_size: int,
    console: Console,
    label: str,
) -> list[Row]:
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("generate", total=len(items))
        return generate_rows(engine, items, sampling, batch_size, lambda n: bar.advance(task, n))


def compute_generation_metrics(
    engine: EngineLike,
    samples: Sequence[Sample],
    *,
    metrics: str | Sequence[str] = "auto",
    sampling: Sampling | None = None,
    batch_size: int = 8,
    limit: int | None = 64,
    mode: str = "generate",
    turns: str = "all",
    record_keys: Sequence[str] | None = None,
) -> dict[str, float]:
    """Generate for up to `limit` prompts of in-memory samples and score them (for a Trainer callback).

    `engine` is anything with `.model`, `.tokenizer`, `.template` (e.g. `Engine(model, tokenizer, template,
    name, has_adapter)`); the model is put in eval mode with the KV cache on, and restored afterwards.
    Samples need their answers (the reference is each scored assistant turn / response).
    """
    items = [item for s in samples for item in eval_items(s, mode, None, turns) if has_reference(item)]
    items = items[:limit] if limit is not None else items
    if not items:
        return {}
    model = engine.model
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = True  # training turns the cache off; generating without it is quadratic
    try:
        rows = generate_rows(engine, items, sampling or Sampling(max_new_tokens=128), batch_size)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    return evaluate_predictions(rows, metrics, record_keys=record_keys)


# ---------------------------------------------------------------- files and tables
