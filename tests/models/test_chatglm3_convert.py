"""ChatGLM3 → GLM conversion, checked against a from-scratch reference forward pass of ChatGLM3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tests.conftest import DTYPES

from chattune.errors import ModelLoadError
from chattune.models.chatglm3_convert import convert_chatglm3

HIDDEN, LAYERS, HEADS, GROUPS, VOCAB, FFN, HEAD_DIM = 64, 2, 4, 2, 128, 96, 16


def chatglm3_config(**overrides: object) -> dict:
    """A tiny config.json in THUDM/chatglm3-6b's format (same keys, small sizes)."""
    cfg = {
        "_name_or_path": "THUDM/chatglm3-6b",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": FFN,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": HIDDEN,
        "kv_channels": HEAD_DIM,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": GROUPS,
        "num_attention_heads": HEADS,
        "num_layers": LAYERS,
        "original_rope": True,
        "padded_vocab_size": VOCAB,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 256,
        "use_cache": True,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    cfg.update(overrides)
    return cfg


def chatglm3_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under ChatGLM3's names; norms and biases non-trivial so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    heads, hd = cfg["num_attention_heads"], cfg["kv_channels"]
    kv = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    qkv_out = (heads + 2 * kv) * hd

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "transformer.embedding.word_embeddings.weight": rand(VOCAB, HIDDEN, scale=1.0),
        "transformer.rotary_pos_emb.inv_freq": torch.ones(hd // 4),  # stored by THUDM's code, unused
        "transformer.encoder.final_layernorm.weight": 1 + rand(HIDDEN),
        "transformer.output_layer.weight": rand(VOCAB, HIDDEN),
    }
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": 1 + rand(HIDDEN),
            p + "self_attention.query_key_value.weight": rand(qkv_out, HIDDEN),
            p + "self_attention.query_key_value.bias": rand(qkv_out),
            p + "self_attention.dense.weight": rand(HIDDEN, heads * hd),
            p + "post_attention_layernorm.weight": 1 + rand(HIDDEN),
            p + "mlp.dense_h_to_4h.weight": rand(2 * FFN, HIDDEN),
            p + "mlp.dense_4h_to_h.weight": rand(HIDDEN, FFN),
        }
    return sd


def chatglm3_reference_logits(
    sd: dict[str, torch.Tensor], cfg: dict, input_ids: torch.Tensor, interpolate: bool = False
) -> torch.Tensor:
    """ChatGLM3's forward pass written out from THUDM's modeling_chatglm.py (float32, no cache).

    `interpolate`: ChatGLM2-6B-32K's variant, dividing positions by rope_ratio instead of scaling the base.
    """
    heads, hd, eps = cfg["num_attention_heads"], cfg["kv_channels"], cfg["layernorm_epsilon"]
    groups = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    b, s = input_ids.shape

    def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    # RotaryEmbedding(rotary_dim // 2): n_elem = head_dim / 2 dims rotate, base 10000 * rope_ratio
    n_elem, ratio = hd // 2, cfg.get("rope_ratio", 1)
    base = 10000 if interpolate else 10000 * ratio
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    seq_idx = torch.arange(s, dtype=torch.float) / (ratio if interpolate else 1)
    idx_theta = torch.outer(seq_idx, theta)
    rope_cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)  # [s, n_elem/2, 2]

    def apply_rotary(x: torch.Tensor) -> torch.Tensor:  # x: [b, s, heads, hd]
        rot_dim = rope_cache.shape[-2] * 2
        x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        xs = x.reshape(b, s, x.shape[2], rot_dim // 2, 2)
        rc = rope_cache.view(1, s, 1, rot_dim // 2, 2)
        out = torch.stack(
            [
                xs[..., 0] * rc[..., 0] - xs[..., 1] * rc[..., 1],
                xs[..., 1] * rc[..., 0] + xs[..., 0] * rc[..., 1],
            ],
            -1,
        ).flatten(3)
        return torch.cat((out, x_pass), dim=-1)

    h = sd["transformer.embedding.word_embeddings.weight"][input_ids]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = rmsnorm(h, sd[p + "input_layernorm.weight"])
        mixed = F.linear(
            x, sd[p + "self_attention.query_key_value.weight"], sd[p + "self_attention.query_key_value.bias"]
        )
        if cfg["multi_query_attention"]:
            q, k, v = mixed.split([heads * hd, groups * hd, groups * hd], dim=-1)
            q, k, v = q.view(b, s, heads, hd), k.view(b, s, groups, hd), v.view(b, s, groups, hd)
        else:
            q, k, v = mixed.view(b, s, heads, 3 * hd).split(hd, dim=-1)
        q, k = apply_rotary(q), apply_rotary(k)
        # each k/v group serves heads // groups consecutive query heads
        k = k.unsqueeze(-2).expand(b, s, groups, heads // groups, hd).reshape(b, s, heads, hd)
        v = v.unsqueeze(-2).expand(b, s, groups, heads // groups, hd).reshape(b, s, heads, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * hd)
        h = h + F.linear(ctx, sd[p + "self_attention.dense.weight"])
        x = rmsnorm(h, sd[p + "post_attention_layernorm.weight"])
        gate, up = F.linear(x, sd[p + "mlp.dense_h_to_4h.weight"]).chunk(2, dim=-1)
        h = h + F.linear(F.silu(gate) * up, sd[p + "mlp.dense_4h_to_h.weight"])
    h = rmsnorm(h, sd["transformer.encoder.final_layernorm.weight"])
    return F.linear(h, sd["transformer.output_layer.weight"])


@pytest.fixture(scope="module")
def sp_model_bytes() -> bytes:
    """A tiny real sentencepiece model (100 pieces) standing in for ChatGLM3's tokenizer.model."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(200)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=100, model_type="bpe", minloglevel=2
    )
    return buf.getvalue()


# The lines of the remote code that tell the two rope_ratio meanings apart.
MODELING_CHATGLM3 = (
    "        base = base * self.rope_ratio\n        seq_idx = torch.arange(seq_len, dtype=torch.float)\n"
)
MODELING_CHATGLM2_32K = "    seq_idx = torch.arange(seq_len, dtype=dtype, device=device) / self.rope_ratio\n"


def write_checkpoint(
    path: Path, cfg: dict, sd: dict[str, torch.Tensor], sp: bytes, fmt: str, modeling: str = MODELING_CHATGLM3
) -> Path:
    """Save `sd` like the THUDM repo does: `fmt` is safetensors, bin, or sharded-bin (2 shards + index)."""
    path.mkdir(parents=True)
    (path / "modeling_chatglm.py").write_text(modeling)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer.model").write_bytes(sp)
    if fmt == "safetensors":
        save_file(sd, str(path / "model.safetensors"))
    elif fmt == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    else:
        names = sorted(sd)
        halves = {
            "pytorch_model-00001-of-00002.bin": names[::2],
            "pytorch_model-00002-of-00002.bin": names[1::2],
        }
        for file, keys in halves.items():
            torch.save({k: sd[k] for k in keys}, path / file)
        weight_map = {k: file for file, keys in halves.items() for k in keys}
        (path / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return path


# Logits of the converted model against the reference forward pass (fp32, from the same weights), as
# (max, mean) absolute difference. fp32: the same arithmetic laid out differently (fused vs split q/k/v,
# rotary layouts), measured 6e-6 / 7e-7, held to assert_close's 1e-4. bf16: the same files computed in fp32
# still match to 6e-6 (the conversion itself is exact, checked below), but computed in bf16 every matmul and
# norm rounds to 8 significant bits: measured 0.16 / 0.02 apart on logits of spread 1.7, the same as the
# converted model in bf16 against itself in fp32; held to 0.3 / 0.04. A wrong layout is off by ~1.7.
SAFETENSORS_DTYPE = {"fp32": "F32", "bf16": "BF16"}
LOGIT_TOLERANCE = {"fp32": (1e-4, 1e-4), "bf16": (0.3, 0.04)}


@pytest.mark.parametrize(
    ("fmt", "overrides", "interpolate"),
    [
        ("safetensors", {}, False),
        ("sharded-bin", {"rope_ratio": 50}, False),  # chatglm3-6b-32k: base 10000 * 50
        ("bin", {"multi_query_attention": False}, False),  # plain multi-head attention: per-head q|k|v layout
        ("bin", {"multi_query_group_num": HEADS}, False),  # grouped layout even with as many groups as heads
        ("safetensors", {"rope_ratio": 4}, True),  # chatglm2-6b-32k: positions / rope_ratio
    ],
)
def test_converted_glm_matches_chatglm3_reference(
    tmp_path: Path, sp_model_bytes: bytes, fmt: str, overrides: dict, interpolate: bool, precision: str
) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GlmForCausalLM

    dtype = DTYPES[precision]
    cfg = chatglm3_config(torch_dtype=str(dtype).removeprefix("torch."), **overrides)
    sd = {k: v.to(dtype) for k, v in chatglm3_weights(cfg).items()}  # THUDM ships half-precision weights
    modeling = MODELING_CHATGLM2_32K if interpolate else MODELING_CHATGLM3
    src = write_checkpoint(tmp_path / "chatglm3", cfg, sd, sp_model_bytes, fmt, modeling)
    dst = convert_chatglm3(src, tmp_path / "glm")
    for shard in dst.glob("*.safetensors"):  # the weights keep their precision: no silent doubling in size
        with safe_open(shard, "pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            assert {f.get_slice(k).get_dtype() for k in names} == {SAFETENSORS_DTYPE[precision]}

    model, info = AutoModelForCausalLM.from_pretrained(dst, dtype=dtype, output_loading_info=True)
    assert isinstance(model, GlmForCausalLM)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reference_sd = {k: v.float() for k, v in sd.items()}
    input_ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    want = chatglm3_reference_logits(reference_sd, cfg, input_ids, interpolate)
    with torch.no_grad():
        got = model(input_ids).logits.float()
        exact = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)(input_ids).logits
    torch.testing.assert_close(exact, want, atol=1e-4, rtol=1e-4)
    most, mean = LOGIT_TOLERANCE[precision]
    assert (got - want).abs().max() <= most and (got - want).abs().mean() <= mean

    # incremental decoding (KV cache, rotary offsets) agrees with the reference on the whole sequence: each
    # greedy token is the reference's best, or (bf16) within rounding of it where two logits nearly tie
    prompt = input_ids[:1, :4]
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    tie = most if precision == "bf16" else 0.0
    for length in range(4, 10):
        logits = chatglm3_reference_logits(reference_sd, cfg, generated[:, :length], interpolate)[0, -1]
        assert logits[generated[0, length]] >= logits.max() - tie, (length, generated.tolist())


def test_output_files_config_and_tokenizer(tmp_path: Path, sp_model_bytes: bytes) -> None:
    cfg = chatglm3_config(rope_ratio=2)
    src = write_checkpoint(tmp_path / "src", cfg, chatglm3_weights(cfg), sp_model_bytes, "sharded-bin")
    dst = convert_chatglm3(src, tmp_path / "dst")

    files = sorted(p.name for p in dst.iterdir())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))], files
    assert "model-00001-of-00002.safetensors" in files and "model.safetensors.index.json" in files
    assert (dst / "tokenizer.model").read_bytes() == sp_model_bytes
    assert json.loads((dst / "tokenizer_config.json").read_text())["tokenizer_class"] == "ChatGLM3Tokenizer"

    glm = json.loads((dst / "config.json").read_text())
    assert glm["model_type"] == "glm" and glm["architectures"] == ["GlmForCausalLM"]
    assert glm["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert glm["rope_parameters"]["rope_theta"] == 20000.0
    assert (glm["num_key_value_heads"], glm["head_dim"], glm["max_position_embeddings"]) == (
        GROUPS,
        HEAD_DIM,
        256,
    )
    assert "auto_map" not in glm  # no remote code

    gen = json.loads((dst / "generation_config.json").read_text())
    # sentencepiece eos, then <|user|> and <|observation|>, appended after the 100 pieces like ChatGLM3's tokenizer
    assert gen["eos_token_id"] == [2, 106, 108]


def test_bad_inputs_are_clear_errors(tmp_path: Path, sp_model_bytes: bytes) -> None:
    cfg = chatglm3_config()
    sd = chatglm3_weights(cfg)
    sd["transformer.prefix_encoder.embedding.weight"] = torch.zeros(4, 8)  # a P-tuning checkpoint
    src = write_checkpoint(tmp_path / "ptuned", cfg, sd, sp_model_bytes, "safetensors")
    with pytest.raises(ModelLoadError, match="prefix_encoder"):
        convert_chatglm3(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written

    layernorm = write_checkpoint(
        tmp_path / "ln", chatglm3_config(rmsnorm=False), chatglm3_weights(cfg), sp_model_bytes, "bin"
    )
    with pytest.raises(ModelLoadError, match="RMSNorm"):
        convert_chatglm3(layernorm, tmp_path / "out")

    (tmp_path / "notempty").mkdir()
    (tmp_path / "notempty" / "x").write_text("x")
    good = write_checkpoint(tmp_path / "good", cfg, chatglm3_weights(cfg), sp_model_bytes, "bin")
    with pytest.raises(ModelLoadError, match="not empty"):
        convert_chatglm3(good, tmp_path / "notempty")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        convert_chatglm3(tmp_path / "notempty", tmp_path / "out2")
