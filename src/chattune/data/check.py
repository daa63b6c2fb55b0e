"""`chattune data check`: the per-token sanity table and the data statistics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from chattune.data.encode import DataStats
from chattune.data.templates import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def sanity_lines(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Sequence[int],
    labels: Sequence[int],
    reasoning: Sequence[int] = (),
) -> list[tuple[str, bool]]:
    """One line per token, ChatGLM3-style `'%20s: %6d -> %6d'`, and whether the token is learnt.

    Tokens of a reasoning trace (`reasoning`: token ranges [lo, hi, ...]) are marked `reasoning` at the end.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(input_ids))
    thought = {i for lo, hi in zip(reasoning[::2], reasoning[1::2], strict=True) for i in range(lo, hi)}
    return [
        (
            "%20s: %6d -> %6d" % (repr(piece), tid, label) + ("  reasoning" if i in thought else ""),  # noqa: UP031  (the demo's format)
            label != IGNORE_INDEX,
        )
        for i, (piece, tid, label) in enumerate(zip(pieces, input_ids, labels, strict=True))
    ]


def print_sanity(
    console: Console,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Sequence[int],
    labels: Sequence[int],
    reasoning: Sequence[int] = (),
) -> None:
    """Print the table; learnt tokens are highlighted when the output is a terminal, reasoning ones dimmed."""
    console.print("Sanity Check >>>>>>>>>>>>>", markup=False, highlight=False)
    for line, trained in sanity_lines(tokenizer, input_ids, labels, reasoning):
        style = ("green" if line.endswith("reasoning") else "bold green") if trained else None
        console.print(line, style=style, markup=False, highlight=False)
    console.print("<<<<<<<<<<<<< Sanity Check", markup=False, highlight=False)


def print_check(
    console: Console,
    template_name: str,
    tokenizer_name: str,
    tokenizer: PreTrainedTokenizerBase,
    rows: Any,
    stats: DataStats,
) -> None:
    """`data check`'s report: the template and tokenizer, each row's sanity table, then the statistics."""
    console.print(f"template: {template_name}   tokenizer: {tokenizer_name}", highlight=False)
    for row in rows:
        print_sanity(console, tokenizer, row["input_ids"], row["labels"], row.get("reasoning") or ())
    print_stats(console, stats)


def print_json_samples(console: Console, rows: Any) -> None:
    """One JSON object per sample, unpadded, nothing else."""
    for row in rows:
        console.out(
            json.dumps({"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}), highlight=False
        )


def stats_table(stats: DataStats, title: str) -> Table:
    """The statistics of one file as a table."""
    t = Table(title=title, show_header=False, title_justify="left")
    pct = 100 * stats.trained_tokens / stats.tokens if stats.tokens else 0.0
    rows = [
        ("file", stats.file),
        ("records read", f"{stats.read:,}"),
        ("samples kept", f"{stats.kept:,}"),
        ("bad records skipped", f"{stats.skipped_bad:,}"),
        ("dropped (no trained token)", f"{stats.dropped_no_target:,}"),
        ("split per trained turn", split_summary(stats)),
        ("truncated", f"{stats.truncated:,}"),
        ("tokens", f"{stats.tokens:,}"),
        ("trained tokens", f"{stats.trained_tokens:,} ({pct:.1f}%)"),
        (
            "reasoning tokens",
            f"{stats.reasoning_tokens:,}" + ("" if stats.reasoning_trained else " (not trained)"),
        ),
        ("length p50/p90/p99/max", " / ".join(str(v) for v in stats.percentiles().values()) or "-"),
        ("formats", ", ".join(f"{k}: {v:,}" for k, v in stats.formats.items()) or "-"),
        ("unread fields", _counts({k: v["count"] for k, v in stats.unknown_fields.items()})),
        ("other record fields", _counts(stats.extra_fields)),
        ("from cache", "yes" if stats.cached else "no"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v:,})" for k, v in counts.items()) or "-"


def split_summary(stats: DataStats) -> str:
    """How many records became one sample per trained turn, and the tokens that cost."""
    if not stats.split_records:
        return "0"
    pct = 100 * stats.split_extra_tokens / max(stats.tokens - stats.split_extra_tokens, 1)
    return f"{stats.split_records:,} records (+{stats.split_extra_tokens:,} tokens, +{pct:.1f}%)"


def print_stats(console: Console, stats: DataStats, title: str = "Data statistics") -> None:
    """Print the statistics, and the first skipped records' reasons."""
    console.print(stats_table(stats, title))
    for note in stats.notes:
        console.print(f"[yellow]warning:[/] {note}", highlight=False)
    for name, seen in stats.unknown_fields.items():
        console.print(
            f"[yellow]warning:[/] field '{name}' is not read by this format and is ignored "
            f"({seen['count']:,} times; first at {seen['first']}).{seen['hint']} "
            "Set strict_fields: true to make it an error.",
            highlight=False,
        )
    if stats.skipped_bad:
        console.print(f"[yellow]{stats.skipped_bad} bad record(s) skipped; first ones:[/]")
        for reason in stats.bad_examples:
            console.print(f"  - {reason}", markup=False)
