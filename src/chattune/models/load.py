"""One loader for tokenizers and models, used by every command."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chattune.errors import ModelLoadError

if TYPE_CHECKING:
    from torch.nn import Module

log = logging.getLogger("chattune.models")


def _say_remote_code(what: str, path: str) -> None:
    """Warn on every load that code shipped with a model may run (the one option that executes files)."""
    log.warning("trust_remote_code is on: Python code shipped with %s (%s) may run", path, what)


def resolve_path(name_or_path: str) -> str:
    """A local dir as is; a default-model alias pulled into the cache; a hub id checked (clear offline error)."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    from chattune.models.pull import resolve_model

    return resolve_model(name_or_path)


def load_tokenizer(model: str, tokenizer: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer for a model: ChatGLM3 dirs get ours (no remote code), others AutoTokenizer."""
    from chattune.models.chatglm3_tokenizer import is_chatglm3_tokenizer_dir, load_chatglm3_tokenizer

    path = resolve_path(tokenizer or model)
    if Path(path).is_dir() and is_chatglm3_tokenizer_dir(path) and not trust_remote_code:
        return load_chatglm3_tokenizer(path)
    from transformers import AutoTokenizer

    if trust_remote_code:
        _say_remote_code("tokenizer", path)

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types here; the user needs one clear message
        raise ModelLoadError(f"could not load a tokenizer from {path}: {e}") from e
    if tok.pad_token_id is None:
        # batching needs a pad id; eos is the usual stand-in and never a learnt position when padding
        tok.pad_token = tok.eos_token
    return tok


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX-512-BF16 or AMX; elsewhere bf16 matmuls run 50-400x slower than fp32.

    Cached: the fused LoRA functions ask on every forward."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def pick_precision(requested: str) -> str:
    """auto → bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPUs without fast bf16."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def compute_dtype(precision: str) -> Any:
    """The torch dtype of a precision name (fp32, bf16, fp16)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def half_frozen_weights(model: Module, precision: str) -> int:
    """Cast the parameters that do not learn to the compute dtype (fp32 master weights only where they
    learn: freeze's frozen blocks take half the memory); returns how many tensors were cast."""
    dtype = compute_dtype(precision)
    cast = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
            cast += 1
    return cast


def load_model(
    model: str,
    *,
    precision: str = "fp32",
    quantization_bit: int | None = None,
    trust_remote_code: bool = False,
    train_full_weights: bool = False,
) -> Any:
    """A causal LM from a local dir, alias or hub id, in the precision asked, optionally 4/8-bit (CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    if quantization_bit is not None and not torch.cuda.is_available():
        raise ModelLoadError(
            f"quantization_bit: {quantization_bit} loads the base through bitsandbytes, which needs a CUDA GPU; "
            "this machine has none. Remove quantization_bit to train in full precision."
        )
    path = resolve_path(model)
    dtype = compute_dtype(precision)
    # full and freeze keep fp32 master weights under half-precision autocast: fp16 weights cannot be unscaled,
    # and a bf16 weight loses every Adam update below 1/256 of its size (bench/full_precision.py measured it);
    # `half_frozen_weights` then brings the weights that do not learn back down to the compute dtype
    if train_full_weights and dtype != torch.float32:
        dtype = torch.float32
    # weights_only=True is transformers' default; passed anyway so that a `.bin` (pickle) checkpoint can never
    # run code while loading, whatever a later default becomes. safetensors files are preferred when present.
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "weights_only": True}
    if trust_remote_code:
        _say_remote_code("model", path)
    if quantization_bit is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization_bit == 4,
            load_in_8bit=quantization_bit == 8,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # many failure types (missing files, bad config, remote code); one clear message
        raise ModelLoadError(f"could not load a causal LM from {path}: {e}") from e
    loaded.config.use_cache = False
    return loaded
