"""One loader for every inference command: base model + optional adapter + the template training used."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chattune.data.templates import Template, build_template
from chattune.errors import ConfigError, ModelLoadError
from chattune.rundir import ADAPTER_CONFIG, read_run_info

if TYPE_CHECKING:
    from torch.nn import Module
    from transformers import PreTrainedTokenizerBase


@dataclass
class Engine:
    """A loaded model ready to generate, with the tokenizer and template it was trained with."""

    model: Module
    tokenizer: PreTrainedTokenizerBase
    template: Template
    name: str
    has_adapter: bool

    @property
    def context_length(self) -> int:
        """The most tokens the model can attend to."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)


def load_engine(
    model: str | None = None,
    adapter: str | Path | None = None,
    *,
    tokenizer: str | None = None,
    template: str | None = None,
    precision: str = "auto",
    trust_remote_code: bool = False,
    pre_seq_len: int | None = None,
) -> Engine:
    """Base model (from --model or the run's record) plus adapter, encoding exactly as training did."""
    import torch

    from chattune.models.load import load_model, load_tokenizer, pick_precision

    info = read_run_info(adapter)
    if adapter is not None and not (Path(adapter).is_dir()):
        raise ModelLoadError(
            f"adapter {adapter} is not a directory (expected a run's final/, best/ or checkpoint-N/)"
        )
    base = model or info.base_model
    if base is None:
        raise ConfigError("--model is required (the adapter does not record its base model)")
    is_peft = adapter is not None and (Path(adapter) / ADAPTER_CONFIG).is_file()
    if adapter is not None and not is_peft:
        base = str(adapter)  # a full/freeze output is a standalone model dir
    tok_source = tokenizer or (str(adapter) if adapter is not None else None)
    tok = load_tokenizer(base, tok_source, trust_remote_code)
    tpl = build_template(template or info.template, tok, info.limits)
    dtype = pick_precision(precision)
    net = load_model(base, precision=dtype, trust_remote_code=trust_remote_code)
    if is_peft:
        from peft import PeftModel

        _check_prefix_length(Path(adapter), pre_seq_len)
        try:
            # peft reads adapter_model.safetensors, or a .bin only through torch.load(weights_only=True)
            net = PeftModel.from_pretrained(net, str(adapter))
        except (
            Exception
        ) as e:  # a corrupt, foreign or unsafe weights file: one clear message, not a traceback
            raise ModelLoadError(f"could not load the adapter from {adapter}: {e}") from e
    net.config.use_cache = True
    if torch.cuda.is_available():
        net = net.to("cuda")
    net.eval()
    name = str(adapter) if adapter is not None else str(base)
    return Engine(net, tok, tpl, name, is_peft)


def _check_prefix_length(adapter: Path, pre_seq_len: int | None) -> None:
    """The tutorials' --pt-pre-seq-len must agree with what the P-Tuning v2 adapter was trained with."""
    if pre_seq_len is None:
        return
    saved = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("num_virtual_tokens")
    if saved is not None and saved != pre_seq_len:
        raise ConfigError(f"--pt-pre-seq-len {pre_seq_len} differs from the adapter's pre_seq_len {saved}")
