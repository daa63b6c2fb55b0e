"""`chattune eval`: answer every sample of a data file, score against the references, optionally beside the base."""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from chattune.errors import ConfigError
from chattune.evaluate.generation import (
    generate_with_bar,
    has_reference,
    items_from_file,
)
from chattune.evaluate.metrics import Row, evaluate_predictions, is_count, metric_names
from chattune.infer.generate import Sampling

if TYPE_CHECKING:
    from chattune.config import TrainConfig

PREDICTIONS_FILE = "generated_predictions.jsonl"
BASE_PREDICTIONS_FILE = "generated_predictions_base.jsonl"
METRICS_FILE = "metrics.json"


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
    if not any(has_reference(item) for item in items):
        raise ConfigError(
            f"{data_file} has no reference answers to score against (chattune infer only generates)"
        )
    out = Path(output_dir)
    load = {"tokenizer": tokenizer, "precision": precision, "trust_remote_code": trust_remote_code}
    engine = load_engine(model, adapter, template=template, **load)
    label = Path(engine.name).name or "model"
    tuned_rows = generate_with_bar(engine, items, sampling, batch_size, console, label)
    write_rows(tuned_rows, out / PREDICTIONS_FILE)
    result: dict[str, Any] = {"tuned": evaluate_predictions(tuned_rows, metrics, record_keys=record_keys)}
    if compare_base:
        if _adapter_can_be_disabled(engine):
            with engine.model.disable_adapter():
                base_rows = generate_with_bar(engine, items, sampling, batch_size, console, "base")
        else:
            base = model or read_run_info(adapter).base_model
            if base is None:
                raise ConfigError("--compare-base needs --model (the adapter does not record its base model)")
            template_name = engine.template.name
            del engine
            _free_memory()
            base_engine = load_engine(base, None, template=template_name, **load)
            base_rows = generate_with_bar(base_engine, items, sampling, batch_size, console, "base")
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
