"""`chattune infer`: one prompt or a whole file, optionally against the base model side by side."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from chattune.data.schema import Pair
from chattune.data.templates import ParsedReply
from chattune.errors import ConfigError
from chattune.infer.batch import Prompt, as_prompt, prompts_from_file, write_predictions
from chattune.infer.engine import Engine, load_engine
from chattune.infer.generate import Sampling, generate_batch


def predict(
    engine: Engine, prompts: list[Prompt], sampling: Sampling, batch_size: int, console: Console
) -> list[ParsedReply]:
    """Replies for all prompts (answer, tool calls and reasoning apart) with a progress bar."""
    ids = [engine.template.encode_prompt(p.sample) for p in prompts]
    columns = (
        TextColumn(f"[bold]{Path(engine.name).name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("generate", total=len(ids))
        raw = generate_batch(engine, ids, sampling, batch_size, lambda n: bar.advance(task, n))
    return [engine.template.parse_reply(text) for text in raw]


def run_infer(
    *,
    model: str | None,
    adapter: str | None,
    tokenizer: str | None,
    template: str | None,
    mode: str,
    prompt: str | None,
    input_file: Path | None,
    output: Path | None,
    system: str | None,
    sampling: Sampling,
    batch_size: int,
    compare_base: bool,
    pre_seq_len: int | None,
    out: Console,
    err: Console,
) -> None:
    """Load, generate, and print or write the predictions."""
    if (prompt is None) == (input_file is None):
        raise ConfigError("give exactly one of --prompt TEXT or --input FILE")
    if input_file is not None and output is None and not compare_base:
        raise ConfigError("--input needs -o OUT.jsonl (or --compare-base to print a table)")
    prompts = (
        prompts_from_file(input_file, mode, system)
        if input_file
        else [as_prompt(Pair(prompt or "", ""), mode, system)]
    )
    engine = load_engine(model, adapter, tokenizer=tokenizer, template=template, pre_seq_len=pre_seq_len)
    predictions = predict(engine, prompts, sampling, batch_size, err)
    if output is not None:
        write_predictions(prompts, predictions, output)
        err.print(f"wrote {len(predictions)} predictions → {output}")
    if not compare_base:
        if prompt is not None:
            if predictions[0].reasoning:
                out.print(predictions[0].reasoning, style="dim", markup=False, highlight=False)
            out.print(predictions[0].display(), markup=False, highlight=False)
        return
    if adapter is None:
        raise ConfigError("--compare-base compares an --adapter with its base model; no --adapter was given")
    base_engine = load_engine(model or _base_of(engine), None, template=engine.template.name)
    base_predictions = predict(base_engine, prompts, sampling, batch_size, err)
    table = Table(title="base vs tuned", show_lines=True)
    for column in ("question", "base model", "tuned model", *(["reference"] if prompts[0].reference else [])):
        table.add_column(column, overflow="fold")
    for p, b, t in zip(prompts, base_predictions, predictions, strict=True):
        table.add_row(
            p.text, b.display(), t.display(), *([p.reference or ""] if prompts[0].reference else [])
        )
    out.print(table)


def _base_of(engine: Engine) -> str:
    from chattune.rundir import read_run_info

    base = read_run_info(engine.name).base_model
    if base is None:
        raise ConfigError("--compare-base needs --model (the adapter does not record its base model)")
    return base
