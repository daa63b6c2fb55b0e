"""transformers internals chattune relies on. Written against transformers 5.25.0 (pyproject: >=5.0).

Each entry says why no public API does the job. tests/test_compat.py checks every one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from transformers import Trainer

if TYPE_CHECKING:
    from torch.nn import Module

WRITTEN_AGAINST = "5.25.0"

# Trainer methods chattune overrides (name: parameters after self), checked by tests/test_compat.py
TRAINER_HOOKS = {
    "_get_train_sampler": ("train_dataset",),
    "_run_epoch": None,  # (*args, **kwargs) passed through: its signature changes between minor versions
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_scaler": ("checkpoint",),
    "_load_rng_state": ("checkpoint",),
    "_get_output_dir": ("trial",),
    "_save_checkpoint": ("model", "trial"),
}


class TrainerHooks(Trainer):
    """The Trainer with its private hooks turned into named, documented methods for a subclass to fill.

    Trainer has no public way to: choose the train sampler (`train_sampler`), skip an epoch that would run
    past max_steps after a resume (`epoch_is_over`), wrap the loading of resume state (`resume_errors`), or
    write a checkpoint somewhere else first (`staging_dir` / `commit_checkpoint`).
    """

    def train_sampler(self, dataset: Any) -> Any:
        """The sampler to train with, or None for the stock one."""
        return None

    def epoch_is_over(self) -> bool:
        """Whether to skip the next epoch entirely (the stock loop would take one step more)."""
        return False

    @contextmanager
    def resume_errors(self, checkpoint: str | None) -> Iterator[None]:
        """Wraps each part of loading a checkpoint's state on resume."""
        yield

    def staging_dir(self) -> str | None:
        """Where the checkpoint being saved goes instead of output_dir (None: output_dir)."""
        return None

    def commit_checkpoint(self, write: Callable[[], None]) -> None:
        """Save a checkpoint: `write()` runs the stock save (into `staging_dir()` when that is set)."""
        write()

    def divides_loss_itself(self) -> None:
        """Tell the Trainer that compute_loss already divides by the step's token count (no second scaling
        across gradient accumulation): `loss_is_scaled_for_ga` has no public setter."""
        self.loss_is_scaled_for_ga = True

    # ---- the private hooks, each forwarding to the method above
    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return self.train_sampler(dataset) or super()._get_train_sampler(train_dataset)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        if self.epoch_is_over():
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Module = None) -> None:
        with self.resume_errors(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        with self.resume_errors(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_scaler(self, checkpoint: str | None) -> None:
        with self.resume_errors(checkpoint):
            super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        with self.resume_errors(checkpoint):
            super()._load_rng_state(checkpoint)

    def _get_output_dir(self, trial: Any) -> str:
        return self.staging_dir() or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Module, trial: Any) -> None:
        self.commit_checkpoint(lambda: super(TrainerHooks, self)._save_checkpoint(model, trial))


def _slow_tokenizer_base() -> type:
    from transformers.tokenization_python import PreTrainedTokenizer

    return PreTrainedTokenizer


class SlowTokenizerHooks(_slow_tokenizer_base()):  # type: ignore[misc]
    """A python (slow) tokenizer that decides which tokens its added-tokens Trie splits out of text
    (`tokens_to_split`): PreTrainedTokenizer rebuilds the Trie in the private `_update_trie` with every added
    token, and offers no public way to keep some of them as plain text."""

    def tokens_to_split(self, extra: list[str]) -> list[str]:
        """The tokens to split out of text whole (default: every added token, plus `extra`)."""
        return [t.content for t in self.added_tokens_decoder.values()] + list(extra)

    def _update_trie(self, unique_no_split_tokens: list[str] | None = None) -> None:
        from transformers.tokenization_python import Trie

        self.tokens_trie = Trie()
        for token in self.tokens_to_split(unique_no_split_tokens or []):
            self.tokens_trie.add(token)


# PreTrainedTokenizer methods SlowTokenizerHooks overrides (name: parameters after self)
TOKENIZER_HOOKS = {"_update_trie": ("unique_no_split_tokens",)}


def attention_registered(name: str) -> bool:
    """Whether an attention function is registered under `name`: AttentionInterface can register but not
    list, and registering twice would replace a compiled function with a new one."""
    from transformers import AttentionInterface

    return name in AttentionInterface._global_mapping


def attention_implementation(config: Any) -> str:
    """The attention a model runs (sdpa, eager, flash_attention_2, ours...): the public `attn_implementation`
    is only what was asked for at load time."""
    return str(getattr(config, "_attn_implementation", "") or "")


def set_name_or_path(config: Any, name: str) -> None:
    """Record the name a converted model goes by (what `name_or_path` reports; no public setter)."""
    config._name_or_path = name


def name_or_path(config: Any) -> str:
    """The name or path a model was loaded from ("" when unknown)."""
    return str(getattr(config, "_name_or_path", "") or "")


def keep_generation_config(generation: Any) -> None:
    """Mark generation settings as deliberate, so that a later load does not re-derive them from the model
    config (transformers re-derives configs flagged `_from_model_config`)."""
    generation._from_model_config = False


def compile_chat_template(template: str) -> Any:
    """transformers' own compiled (sandboxed, cached) Jinja chat template, rendered without
    `apply_chat_template`'s per-call overhead."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


def trie_tokens(trie: Any) -> set[str]:
    """The tokens a tokenizer's added-tokens Trie holds (the Trie has no public accessor)."""
    return trie._tokens


@contextmanager
def quiet_gguf_loading() -> Iterator[None]:
    """Silence the tqdm bar transformers' GGUF loader prints per tensor (it garbles a rich spinner): older
    versions call a module-level `tqdm` that `disable_progress_bar()` does not reach."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return

    def quiet(*args: Any, **kwargs: Any) -> Any:
        return bar(*args, **{**kwargs, "disable": True})

    gguf_utils.tqdm = quiet
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def drop_gguf_quantization(model: Module) -> None:
    """Forget that a model came from a GGUF file, so `save_pretrained` writes plain safetensors (the weights
    are already dequantized): transformers keeps the GGUF quantizer attached with no public way to drop it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for owner, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if getattr(owner, attr, None) is not None:
            delattr(owner, attr)
    model.is_quantized = False
