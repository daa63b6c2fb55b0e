"""From a config to encoded datasets: tokenizer-bound template, per-file encoding with progress and cache."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from chattune.data.cache import remember
from chattune.data.encode import DataStats, encode_file
from chattune.data.templates import Limits, Template, build_template
from chattune.paths import data_cache_home

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from chattune.config import TrainConfig


def template_for(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> Template:
    """The config's template bound to this tokenizer."""
    return build_template(cfg.template, tokenizer, Limits.of(cfg), train_reasoning=cfg.train_reasoning)


def encode_split(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    file: str,
    console: Console,
    probe: str | None = None,
) -> tuple[datasets.Dataset, DataStats]:
    """Encode one data file as the config says, showing progress on the console.

    With a `probe` (taken before the tokenizer loaded), the cache entry is also indexed under it, so that
    `data check` finds it next time without loading the tokenizer.
    """
    cache_dir = data_cache_home()
    on_entry = partial(remember, cache_dir, probe, template.name, tokenizer) if probe is not None else None
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"Encoding {file}", total=None)

        def tick(kept: int) -> None:  # called once per encoded chunk of samples
            bar.update(task, description=f"Encoding {file}: {kept:,} samples")

        return encode_file(
            file,
            template,
            tokenizer,
            fmt=cfg.format,
            on_bad_record=cfg.on_bad_record,
            strict_fields=cfg.strict_fields,
            cache_dir=cache_dir,
            progress=tick,
            on_entry=on_entry,
        )
