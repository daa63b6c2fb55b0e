"""`chattune data check`: every token of the first samples with its label, then the statistics — the data half
of the training recipe, encoded exactly as `chattune train` will encode it (and cached for it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Console

from chattune.errors import ChattuneError
from chattune.paths import data_cache_home

if TYPE_CHECKING:
    from chattune.config import TrainConfig


def check_data(
    cfg: TrainConfig,
    split: str,
    n: int,
    as_json: bool,
    *,
    out: Console,
    err: Console,
    before_libraries: Callable[[], None] = lambda: None,
) -> None:
    """Print the first `n` samples of the split's file token by token (or as JSON lines), then its statistics.

    `before_libraries` runs before transformers loads (the CLI quietens it there); an already encoded file is
    printed from the cache alone."""
    from chattune.data.cache import lookup, probe_key
    from chattune.data.check import print_check, print_json_samples

    key = {"train": "train_file", "eval": "eval_file"}.get(split)
    if key is None:
        raise ChattuneError(f"--split must be train or eval, not {split!r}")
    cfg.require(key)
    file = getattr(cfg, key)
    # taken before the tokenizer loads: should its files change meanwhile, the index written below is filed
    # under their old state, which no later run matches
    probe = probe_key(cfg, file)
    hit = lookup(data_cache_home(), probe, n, with_tokens=not as_json) if probe else None
    if hit is not None:  # already encoded: printed from the cache alone, no tokenizer (torch, transformers)
        rows, stats, names, header = hit.rows, hit.stats, hit.tokens, (hit.template, hit.tokenizer)
    else:
        from chattune.data.prepare import encode_split, template_for
        from chattune.models.load import load_tokenizer

        before_libraries()
        tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code)
        template = template_for(cfg, tokenizer)
        dataset, stats = encode_split(cfg, tokenizer, template, file, err, probe=probe)
        rows = dataset.select(range(min(n, len(dataset))))
        names, header = tokenizer, (template.name, tokenizer.name_or_path)
    if as_json:
        print_json_samples(out, rows)
        return
    print_check(out, *header, names, rows, stats)
