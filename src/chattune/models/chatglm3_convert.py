"""Rewrite a THUDM ChatGLM3 (or ChatGLM2) checkpoint as transformers' native GLM, so no remote code is needed.

ChatGLM3 is the GLM architecture `GlmForCausalLM` implements: RMSNorm, grouped-query attention with a
q/k/v bias, rotary embedding on the first half of each head's dims in interleaved pairs
(`partial_rotary_factor` 0.5, base 10000 * rope_ratio), and a SwiGLU MLP whose fused input projection
is [gate | up]. Only names change, plus splitting the fused `query_key_value` into q/k/v.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from chattune.errors import ModelLoadError

TOKENIZER_FILE = "tokenizer.model"
# Special tokens ChatGLM3's tokenizer appends after the sentencepiece vocabulary, in this order.
_CHATGLM3_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                      "<|observation|>"]  # fmt: skip
_TOP_LEVEL = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate | up], as GlmMLP chunks it
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")


def convert_chatglm3(src: Path, dst: Path) -> Path:
    """Convert the ChatGLM3 checkpoint dir `src` into a `GlmForCausalLM` dir `dst` (safetensors); returns `dst`."""
    src, dst = Path(src), Path(dst)
    cfg = _read_config(src)
    glm = glm_config_from_chatglm3(cfg, interpolate_positions=_interpolates_positions(src))
    shards = _source_shards(src)
    if not (src / TOKENIZER_FILE).is_file():
        raise ModelLoadError(
            f"{src} has no {TOKENIZER_FILE}; a ChatGLM3 checkpoint dir holds its tokenizer too."
        )
    if dst.exists() and any(dst.iterdir()):
        raise ModelLoadError(
            f"{dst} already exists and is not empty; choose a new directory for the conversion."
        )
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        _write(src, dst, cfg, glm, shards)
    except BaseException:  # no half-written model: dst was empty (or absent) before
        shutil.rmtree(dst, ignore_errors=True)
        if not created:
            dst.mkdir()
        raise
    return dst


def _write(src: Path, dst: Path, cfg: dict[str, Any], glm: Any, shards: list[Path]) -> None:
    """Write the converted weights shard by shard, then config, generation config and tokenizer."""
    from safetensors.torch import save_file

    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]  # fmt: skip
    weight_map: dict[str, str] = {}
    total = 0
    for shard, name in zip(shards, names, strict=True):
        grouped = bool(cfg.get("multi_query_attention", False))
        tensors = convert_state_dict(_load_shard(shard), glm, grouped)  # one shard in memory at a time
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    missing = sorted(set(expected_glm_keys(glm)) - set(weight_map))
    if missing:
        raise ModelLoadError(
            f"{src} lacks weights a ChatGLM3 model needs: {', '.join(missing[:5])}"
            f"{' …' if len(missing) > 5 else ''} (after renaming to GLM). Is the checkpoint complete?"
        )
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    glm.save_pretrained(dst)
    _generation_config(src, cfg).save_pretrained(dst)
    shutil.copyfile(src / TOKENIZER_FILE, dst / TOKENIZER_FILE)
    (dst / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "ChatGLM3Tokenizer"}, indent=2) + "\n"
    )


def glm_config_from_chatglm3(cfg: dict[str, Any], interpolate_positions: bool = False) -> Any:
    """The `GlmConfig` equivalent to a ChatGLM3 `config.json` dict; ModelLoadError for variants GLM can't express.

    `rope_ratio` scales the rotary base (ChatGLM3, GLM-4); with `interpolate_positions` it divides the
    positions instead (ChatGLM2-6B-32K's code), which is transformers' "linear" rope scaling.
    """
    from transformers import GlmConfig

    unsupported = {
        "rmsnorm": (False, "LayerNorm instead of RMSNorm"),
        "post_layer_norm": (False, "no final layer norm"),
        "apply_residual_connection_post_layernorm": (True, "residuals taken after the layer norm"),
        "add_bias_linear": (True, "biases on the dense/MLP layers"),
    }
    for key, (bad, what) in unsupported.items():
        if cfg.get(key, not bad) == bad:
            raise ModelLoadError(
                f"This ChatGLM checkpoint uses {what} ({key}={bad}), which GLM cannot express."
            )
    if "padded_vocab_size" not in cfg or "num_layers" not in cfg:
        raise ModelLoadError(
            "config.json is not a ChatGLM2/ChatGLM3 config (no padded_vocab_size/num_layers); "
            "only THUDM/chatglm3-6b style checkpoints can be converted."
        )
    heads = cfg["num_attention_heads"]
    ratio = cfg.get("rope_ratio", 1)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if ratio != 1 and interpolate_positions:
        rope |= {"rope_type": "linear", "factor": float(ratio)}
    else:
        rope["rope_theta"] = 10000.0 * ratio
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return GlmConfig(
        architectures=["GlmForCausalLM"],
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg["multi_query_group_num"]
        if cfg.get("multi_query_attention", False)
        else heads,
        head_dim=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg.get("seq_length", 8192),
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(cfg.get("add_qkv_bias", False)),
        attention_dropout=cfg.get("attention_dropout", 0.0),
        rope_parameters=rope,  # partial_rotary_factor 0.5: ChatGLM rotates head_dim // 2 dims
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        pad_token_id=cfg.get("pad_token_id", 0),
        eos_token_id=cfg.get("eos_token_id", 2),
        use_cache=cfg.get("use_cache", True),
        **({"dtype": dtype} if dtype else {}),
    )


def convert_state_dict(
    state: dict[str, torch.Tensor], glm: Any, grouped: bool = True
) -> dict[str, torch.Tensor]:
    """Rename (and split the fused q/k/v of) ChatGLM3 weights into GLM names; unknown names are an error.

    `grouped`: the config's multi_query_attention (ChatGLM3: true), which decides the fused q/k/v layout.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        layer = _LAYER_RE.fullmatch(name)
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = tensor
        elif name.endswith("rotary_pos_emb.inv_freq"):
            continue  # recomputed from the config
        elif layer and layer[2] in _LAYER:
            out[f"model.layers.{layer[1]}.{_LAYER[layer[2]]}"] = tensor
        elif layer and layer[2] in (
            "self_attention.query_key_value.weight",
            "self_attention.query_key_value.bias",
        ):
            kind = layer[2].rsplit(".", 1)[1]
            for proj, part in zip("qkv", split_qkv(tensor, glm, grouped), strict=True):
                # a copy: safetensors refuses tensors that share storage, as views of one tensor do
                out[f"model.layers.{layer[1]}.self_attn.{proj}_proj.{kind}"] = part.clone()
        else:
            unknown.append(name)
    if unknown:
        raise ModelLoadError(
            f"Unexpected weights in the ChatGLM3 checkpoint: {', '.join(sorted(unknown)[:5])}"
            f"{' …' if len(unknown) > 5 else ''}. Only plain ChatGLM3 models convert (merge P-tuning or "
            f"LoRA weights into the model first)."
        )
    return out


def split_qkv(
    fused: torch.Tensor, glm: Any, grouped: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ChatGLM's fused query_key_value weight or bias (output dim first) into q, k, v."""
    heads, kv_heads, head_dim = glm.num_attention_heads, glm.num_key_value_heads, glm.head_dim
    if grouped:  # multi_query_attention: [all q heads | k groups | v groups]
        q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=0)
        return q, k, v
    # plain multi-head: per head [q_h | k_h | v_h]
    per_head = fused.reshape(heads, 3 * head_dim, *fused.shape[1:])
    q, k, v = (t.reshape(heads * head_dim, *fused.shape[1:]) for t in per_head.split(head_dim, dim=1))
    return q, k, v


def expected_glm_keys(glm: Any) -> list[str]:
    """Every weight name a `GlmForCausalLM` with this config loads."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not glm.tie_word_embeddings:
        keys.append("lm_head.weight")
    projections = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [
        "mlp.gate_up_proj.weight",
        "mlp.down_proj.weight",
    ]
    if glm.attention_bias:
        projections += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    norms = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    for i in range(glm.num_hidden_layers):
        keys += [f"model.layers.{i}.{name}" for name in projections + norms]
    return keys


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{src} has no config.json; pass a THUDM/chatglm3-6b checkpoint directory.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _interpolates_positions(src: Path) -> bool:
    """Whether the checkpoint's own modeling code divides positions by rope_ratio (ChatGLM2-32K) rather than
    multiplying the rotary base by it (ChatGLM3); without the code, assume ChatGLM3."""
    code_file = src / "modeling_chatglm.py"
    code = code_file.read_text(errors="replace") if code_file.is_file() else ""
    return "base * self.rope_ratio" not in code and re.search(r"/ *(self\.)?rope_ratio", code) is not None


def _source_shards(src: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors preferred over .bin, sharded (index) or single."""
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (src / index).is_file():
            files = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise ModelLoadError(f"{src / index} lists shards that are not there: {', '.join(missing)}")
            return [src / f for f in files]
        if (src / single).is_file():
            return [src / single]
    raise ModelLoadError(
        f"{src} has no model weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])."
    )


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects


def _generation_config(src: Path, cfg: dict[str, Any]) -> Any:
    """Stop at eos and at the next turn's role token (<|user|>, <|observation|>), as ChatGLM3's chat() does."""
    from transformers import GenerationConfig

    eos = cfg.get("eos_token_id", 2)
    eos_ids = list(eos) if isinstance(eos, list) else [eos]
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(src / TOKENIZER_FILE))
        n_words = sp.vocab_size()
        eos_ids = [sp.eos_id()] + [
            n_words + _CHATGLM3_SPECIALS.index(t) for t in ("<|user|>", "<|observation|>")
        ]
    except Exception:  # not a loadable sentencepiece model: keep the config's eos only
        pass
    return GenerationConfig(eos_token_id=eos_ids, pad_token_id=cfg.get("pad_token_id", 0))
