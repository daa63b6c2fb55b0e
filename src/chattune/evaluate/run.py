"""`chattune eval`: answer every sample of a data file, score against the references, optionally beside the base."""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from chattune.data.schema import Conversation, Message, Pair, Sample, ToolCall
from chattune.data.templates import ParsedReply
from chattune.errors import ConfigError
from chattune.evaluate.metrics import Row, evaluate_predictions, is_count, metric_names
from chattune.infer.batch import Prompt, as_prompt, read_samples_for_inference
from chattune.infer.generate import Sampling, generate_batch

if TYPE_CHECKING:
    from chattune.config import TrainConfig

PREDICTIONS_FILE = "generated_predictions.jsonl"
BASE_PREDICTIONS_FILE = "generated_predictions_base.jsonl"
METRICS_FILE = "metrics.json"


class EngineLike(Protocol):
    """What generation needs: a model, its tokenizer and the template it was trained with (e.g. an `Engine`)."""

    model: Any
    tokenizer: Any
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


def _has_reference(item: EvalItem) -> bool:
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


def _generate_with_bar(
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
    items = [item for s in samples for item in eval_items(s, mode, None, turns) if _has_reference(item)]
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


def write_rows(rows: Sequence[Row], path: Path) -> None:
    """One JSON line per prediction (atomic write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_rows(path: str | Path) -> list[Row]:
    """Rows of a predictions file (ours, or `chattune infer -o`), to score again without a model."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if is_count(name) else f"{value:.2f}"


def metrics_table(
    tuned: dict[str, float], base: dict[str, float] | None = None, title: str = "eval"
) -> Table:
    """Scores as a table; with `base`, a before/after table with the change (green when better)."""
    table = Table(title=title)
    table.add_column("metric")
    if base is not None:
        table.add_column("base", justify="right")
    table.add_column("tuned" if base is not None else "value", justify="right")
    if base is not None:
        table.add_column("Δ", justify="right")
    names = [*tuned, *(k for k in (base or {}) if k not in tuned)]
    names = [n for n in names if not is_count(n)] + [n for n in names if is_count(n)]  # scores first
    for name in names:
        value = tuned.get(name)
        if base is None:
            table.add_row(name, _fmt(name, value))
            continue
        before = base.get(name)
        delta = ""
        if not is_count(name) and value is not None and before is not None:
            d = value - before
            delta = f"[{'green' if d > 0 else 'red' if d < 0 else 'dim'}]{d:+.2f}[/]"  # every score: higher is better
        table.add_row(name, _fmt(name, before), _fmt(name, value), delta)
    return table


# ---------------------------------------------------------------- the command


def _free_memory() -> None:
    """Give the tuned model's memory back before a second model is loaded (one GPU rarely holds two)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _adapter_can_be_disabled(engine: Any) -> bool:
    """LoRA-style adapters switch off in place, so the base answers without a second load; prefix methods
    (P-Tuning v2) change generation's inputs, so for them the base is loaded afresh."""
    if not engine.has_adapter or not hasattr(engine.model, "disable_adapter"):
        return False
    config = getattr(engine.model, "active_peft_config", None)
    return config is not None and not getattr(config, "is_prompt_learning", False)


def run_eval(
    *,
    model: str | None,
    adapter: str | Path | None,
    data_file: str | Path,
    output_dir: str | Path,
    mode: str = "generate",
    batch_size: int = 8,
    sampling: Sampling | None = None,
    metrics: str | Sequence[str] = "auto",
    compare_base: bool = False,
    limit: int | None = None,
    console: Console | None = None,
    system: str | None = None,
    turns: str = "all",
    record_keys: Sequence[str] | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    precision: str = "auto",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Generate for every sample, write predictions and metrics.json, print the scores; returns metrics.json."""
    from chattune.infer.engine import load_engine
    from chattune.rundir import read_run_info

    console = console or Console(stderr=True)
    sampling = sampling or Sampling()
    metric_names(metrics)  # fail on a misspelt family before any model is loaded
    if compare_base and adapter is None:
        raise ConfigError("--compare-base compares an --adapter with its base model; no --adapter was given")
    items = items_from_file(data_file, mode, system, turns, limit)
    if not any(_has_reference(item) for item in items):
        raise ConfigError(
            f"{data_file} has no reference answers to score against (chattune infer only generates)"
        )
    out = Path(output_dir)
    load = {"tokenizer": tokenizer, "precision": precision, "trust_remote_code": trust_remote_code}
    engine = load_engine(model, adapter, template=template, **load)
    label = Path(engine.name).name or "model"
    tuned_rows = _generate_with_bar(engine, items, sampling, batch_size, console, label)
    write_rows(tuned_rows, out / PREDICTIONS_FILE)
    result: dict[str, Any] = {"tuned": evaluate_predictions(tuned_rows, metrics, record_keys=record_keys)}
    if compare_base:
        if _adapter_can_be_disabled(engine):
            with engine.model.disable_adapter():
                base_rows = _generate_with_bar(engine, items, sampling, batch_size, console, "base")
        else:
            base = model or read_run_info(adapter).base_model
            if base is None:
                raise ConfigError("--compare-base needs --model (the adapter does not record its base model)")
            template_name = engine.template.name
            del engine
            _free_memory()
            base_engine = load_engine(base, None, template=template_name, **load)
            base_rows = _generate_with_bar(base_engine, items, sampling, batch_size, console, "base")
        write_rows(base_rows, out / BASE_PREDICTIONS_FILE)
        result["base"] = evaluate_predictions(base_rows, metrics, record_keys=record_keys)
    result["run"] = {
        "model": model,
        "adapter": str(adapter) if adapter is not None else None,
        "data_file": str(data_file),
        "mode": mode,
        "turns": turns,
        "metrics": metrics if isinstance(metrics, str) else list(metrics),
        "sampling": asdict(sampling),
        "predictions": len(tuned_rows),
    }
    (out / METRICS_FILE).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(metrics_table(result["tuned"], result.get("base"), title=f"eval on {Path(data_file).name}"))
    console.print(f"wrote {len(tuned_rows)} predictions and {METRICS_FILE} → {out}")
    return result


def eval_from_config(
    cfg: TrainConfig,
    *,
    adapter: str | Path | None = None,
    data_file: str | Path | None = None,
    output_dir: str | Path | None = None,
    batch_size: int = 8,
    sampling: Sampling | None = None,
    metrics: str | Sequence[str] = "auto",
    compare_base: bool = False,
    limit: int | None = None,
    turns: str = "all",
    record_keys: Sequence[str] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate a training run: its `final/` on test_file (or eval_file), results in `output_dir/eval/`."""
    run_dir = Path(cfg.output_dir)
    adapter = Path(adapter) if adapter is not None else run_dir / "final"
    if not adapter.is_dir():
        raise ConfigError(f"{adapter} does not exist: train first (chattune train), or pass --adapter")
    data_file = data_file or cfg.test_file or cfg.eval_file
    if not data_file:
        raise ConfigError("the config must set test_file or eval_file for chattune eval")
    return run_eval(
        model=cfg.model,
        adapter=adapter,
        data_file=data_file,
        output_dir=output_dir or run_dir / "eval",
        batch_size=batch_size,
        # the tutorials generate up to the target length the model was trained on
        sampling=sampling or Sampling(max_new_tokens=cfg.max_target_len),
        metrics=metrics,
        compare_base=compare_base,
        limit=limit,
        console=console,
        turns=turns,
        record_keys=record_keys,
        tokenizer=cfg.tokenizer,
        precision=cfg.precision,
        trust_remote_code=cfg.trust_remote_code,
    )


def score_file(
    predictions: str | Path,
    metrics: str | Sequence[str] = "auto",
    *,
    record_keys: Sequence[str] | None = None,
    console: Console | None = None,
) -> dict[str, float]:
    """Score an existing predictions file (no model) and print the table."""
    scores = evaluate_predictions(read_rows(predictions), metrics, record_keys=record_keys)
    if console is not None:
        console.print(metrics_table(scores, title=f"scores of {Path(predictions).name}"))
    return scores
