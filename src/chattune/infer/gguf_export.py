"""Write a merged (or full) model as one GGUF file: llama.cpp tensor names, layouts and hyperparameters.

Names come from the `gguf` package's TensorNameMap; quantizing from `gguf.quants` (pure numpy, no native
tools); the file from its GGUFWriter. The reshapes between transformers' layout and llama.cpp's:

* Llama / Mistral (llama.cpp `llama`): llama.cpp rotates each head's dims in adjacent pairs, transformers in
  two halves (`rotate_half`), so q and k rows are reordered per head from [half0 | half1] to interleaved
  pairs; transformers' GGUF loader undoes exactly this.
* Qwen2 / Qwen3: both sides rotate halves (NeoX style): no reshape.
* ChatGLM3 (llama.cpp `chatglm`, from chattune's `GlmForCausalLM` conversion): the original ChatGLM layout
  comes back. q, k and v (weights and biases) are fused along the output dim as [q | k | v] into `attn_qkv`;
  `gate_up_proj` is already the fused [gate | up] that `ffn_up` holds. GLM and llama.cpp both rotate the
  first half of each head in adjacent pairs, so q and k keep their order; `rope.dimension_count` is half the
  head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from chattune.compat.transformers import name_or_path
from chattune.errors import ConfigError

if TYPE_CHECKING:
    from torch.nn import Module

# transformers architecture -> (gguf architecture name, whether q/k rows are permuted for llama.cpp's rope)
ARCHITECTURES = {
    "GlmForCausalLM": ("chatglm", False),
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
SUPPORTED = (
    "ChatGLM3 (GlmForCausalLM, as `chattune model convert-chatglm3` writes it), Llama-family models "
    "(LlamaForCausalLM: SmolLM2, Llama; MistralForCausalLM) and Qwen2/Qwen3 (Qwen2ForCausalLM, Qwen3ForCausalLM)"
)
# Output types: float ones, and every block type gguf.quants quantizes in numpy that llama.cpp runs on
# ordinary models (its ternary TQ1_0/TQ2_0 and gpt-oss' MXFP4 only suit models trained for them).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def ggml_type(name: str) -> Any:
    """The GGMLQuantizationType for one of GGUF_TYPES."""
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def file_type(name: str) -> int:
    """The `general.file_type` value llama.cpp shows for an output type."""
    import gguf

    return int(
        gguf.LlamaFileType[{"f32": "ALL_F32", "f16": "MOSTLY_F16"}.get(name, f"MOSTLY_{name.upper()}")]
    )


def check_architecture(config: dict[str, Any], where: Path) -> str:
    """The gguf architecture for a model's config.json, or a ConfigError naming what is supported."""
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConfigError(
            f"{where} is a {', '.join(archs) or config.get('model_type', 'unknown')} model; GGUF export "
            f"supports {SUPPORTED}. Export it with --format hf and convert that with llama.cpp's "
            "convert_hf_to_gguf.py instead"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ConfigError(
            f"{where} uses {kind!r} rope scaling, which GGUF export does not write yet (default and linear "
            "only); export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHITECTURES[archs[0]][0]


def tensor_type(requested: str, shape: tuple[int, ...]) -> str:
    """The type one tensor is stored in: norms and biases stay f32 (tiny, and llama.cpp wants them so); a
    matrix whose rows do not split into whole quantization blocks falls back to f16."""
    import gguf

    if len(shape) < 2:
        return "f32"
    block = gguf.GGML_QUANT_SIZES[ggml_type(requested)][0]
    return requested if shape[-1] % block == 0 else "f16"


def quantize_tensor(tensor: torch.Tensor, kind: str) -> np.ndarray:
    """A tensor as GGUF bytes (or float16/float32 values) of type `kind`, quantized by gguf.quants."""
    from gguf import quants

    return quants.quantize(tensor.detach().to(torch.float32).numpy(), ggml_type(kind))


def _rope_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k rows per head from transformers' [first half | second half] to llama.cpp's adjacent pairs."""
    rest = w.shape[1:]
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(w.shape)


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, shape, type, and how to compute its values (only when it is written)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    values: Callable[[], torch.Tensor]


def plan_tensors(model: Module, arch: str, requested: str) -> list[PlannedTensor]:
    """Every tensor of the GGUF, in file order, mapped and reshaped from the model's state dict."""
    import gguf

    cfg = model.config
    state = model.state_dict()
    layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    permute = next(p for a, p in ARCHITECTURES.values() if a == arch)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    out: list[PlannedTensor] = []
    unknown = []

    def add(name: str, values: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> None:
        out.append(PlannedTensor(name, shape, tensor_type(requested, shape), values))

    for key, tensor in state.items():
        if key == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd when `output` is absent
        if arch == "chatglm" and (".self_attn.k_proj." in key or ".self_attn.v_proj." in key):
            continue  # fused into attn_qkv with q below
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            unknown.append(key)
            continue
        if arch == "chatglm" and ".self_attn.q_proj." in key:
            parts = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            fused = target.replace("attn_q", "attn_qkv")
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            add(fused, lambda parts=parts: torch.cat(parts, dim=0), shape)
        elif permute and key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            n = heads if ".q_proj." in key else kv_heads
            add(target, lambda t=tensor, n=n: _rope_pairs(t, n), tuple(tensor.shape))
        else:
            add(target, lambda t=tensor: t, tuple(tensor.shape))
    if unknown:
        raise ConfigError(
            f"no GGUF name for {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''} in the {arch} "
            "architecture; this variant cannot be exported to GGUF"
        )
    return out


def _rope(cfg: Any) -> dict[str, Any]:
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return params


def write_hparams(writer: Any, cfg: Any, arch: str, requested: str) -> None:
    """Architecture hyperparameters under llama.cpp's keys."""
    import gguf

    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = _rope(cfg)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    # ChatGLM rotates half of each head (partial_rotary_factor 0.5); the others rotate all of it
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if head_dim != cfg.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type(requested))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(
    path: Path,
    model: Module,
    arch: str,
    requested: str,
    metadata: Callable[[Any], None],
    progress: Callable[[int], None] | None = None,
) -> list[PlannedTensor]:
    """Write `model` as a GGUF of type `requested` at `path`; `metadata(writer)` adds the tokenizer keys.

    Tensors are computed and quantized one at a time as they are written, so memory holds one extra tensor
    at most; `progress(n_bytes)` is called after each with the source bytes done.
    """
    import gguf

    if requested not in GGUF_TYPES:
        raise ConfigError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, not {requested!r}")
    plan = plan_tensors(model, arch, requested)
    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_name(name_or_path(model.config) or "chattune export")
        write_hparams(writer, model.config, arch, requested)
        metadata(writer)
        for t in plan:
            block, size = gguf.GGML_QUANT_SIZES[ggml_type(t.kind)]
            nbytes = int(np.prod(t.shape)) // block * size
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=ggml_type(t.kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in _computed(plan):
            writer.write_tensor_data(quantize_tensor(t[1], t[0].kind))
            if progress is not None:
                progress(t[1].numel() * t[1].element_size())
    finally:
        writer.close()
    return plan


def _computed(plan: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, torch.Tensor]]:
    for t in plan:
        with torch.no_grad():
            values = t.values()
        if tuple(values.shape) != t.shape:  # a planned shape that lies would corrupt every later offset
            raise RuntimeError(f"{t.name}: planned {t.shape}, computed {tuple(values.shape)}")
        yield t, values
