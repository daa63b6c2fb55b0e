"""The fused LoRA projection: the same loss and gradients as peft's modules, bias and dropout included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import save_tiny_llama

from chattune.models import fused_lora
from chattune.models.fused_lora import FusedLoraLinearForward, fuse_lora_linears
from chattune.models.fused_mlp import FusedLoraMlpForward, fuse_lora_mlps

IDS = torch.randint(0, 50, (4, 48), generator=torch.Generator().manual_seed(0))
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _assert_same(reference: tuple, fused: tuple) -> None:
    (loss, grads, _), (loss_f, grads_f, _) = reference, fused
    assert torch.allclose(loss, loss_f, rtol=1e-6)
    assert grads.keys() == grads_f.keys() and any("q_proj" in n for n in grads)
    for name in grads:
        assert torch.allclose(grads[name], grads_f[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("with_mlp", [False, True])
def test_same_loss_and_gradients(tiny_model_dir: Path, make_lora_model, lora_step, with_mlp: bool) -> None:
    reference = lora_step(make_lora_model(tiny_model_dir, lora_dropout=0.0), IDS)
    model = make_lora_model(tiny_model_dir, lora_dropout=0.0)
    if with_mlp:
        assert fuse_lora_mlps(model) == 2
    assert fuse_lora_linears(model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    fused = lora_step(model, IDS)
    _assert_same(reference, fused)
    assert fused[2] <= reference[2]  # no more saved for backward than peft's modules


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    """The tiny Llama with biases on q/k/v/o (as Qwen2 has on q/k/v)."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-bias"), chatml_tokenizer, 1, attention_bias=True
    )


def test_frozen_bias(biased_model_dir: Path, make_lora_model, lora_step) -> None:
    reference = lora_step(make_lora_model(biased_model_dir, lora_dropout=0.0), IDS)
    model = make_lora_model(biased_model_dir, lora_dropout=0.0)
    assert fuse_lora_linears(model) == 14
    _assert_same(reference, lora_step(model, IDS))


def test_lora_dropout_gives_peft_gradients_for_the_same_masks(
    tiny_model_dir: Path, make_lora_model, lora_step, replay_masks, monkeypatch
) -> None:
    settings = {"lora_dropout": 0.3, "lora_target": list(ATTENTION)}
    model = make_lora_model(tiny_model_dir, **settings)
    assert fuse_lora_linears(model) == 8
    drawn: list[torch.Tensor] = []
    draw = fused_lora.keep_mask
    monkeypatch.setattr(fused_lora, "keep_mask", lambda like, p: drawn.append(draw(like, p)) or drawn[-1])
    fused = lora_step(model, IDS)
    assert len(drawn) == 8 and 0.6 < float(torch.cat([m.flatten() for m in drawn]).float().mean()) < 0.8

    reference = make_lora_model(tiny_model_dir, **settings)
    replay_masks(reference, drawn, ATTENTION, 0.3)  # drawn in forward order: q, k, v, o per layer
    _assert_same(lora_step(reference, IDS), fused)
    model.eval()  # no dropout in eval, and no gradient: peft's forward, no masks drawn
    drawn.clear()
    with torch.no_grad():
        model(input_ids=IDS)
    assert drawn == []


def test_runs_peft_forward_where_it_does_not_apply(tiny_model_dir: Path, make_lora_model) -> None:
    model = make_lora_model(tiny_model_dir, lora_dropout=0.0)
    assert fuse_lora_linears(model) == 14 and fuse_lora_linears(model) == 14  # a second call changes nothing
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    assert isinstance(layer.forward, FusedLoraLinearForward)
    x = torch.randn(2, 5, 64, requires_grad=True)
    fused = layer(x)
    assert torch.allclose(fused, layer.forward.original(x), atol=1e-6)
    with model.disable_adapter():  # adapters off: the base layer alone
        plain = layer(x)
        assert torch.allclose(plain, layer.base_layer(x))
    assert not torch.allclose(fused, plain)
    with torch.no_grad():
        assert torch.allclose(layer(x), fused, atol=1e-6)
    layer.merge()  # merged: peft's forward, which then skips the adapter
    try:
        assert torch.allclose(layer(x), fused, atol=1e-5)
        assert layer.forward.projection() is None
    finally:
        layer.unmerge()
    assert layer.forward.projection() is not None


def test_fp32_adapters_on_a_bf16_base_compute_as_peft_does(tiny_model_dir: Path, lora_step) -> None:
    # peft keeps adapters in fp32 over a bf16 model (the GPU default): the fused path covers that mix too
    from transformers import AutoModelForCausalLM

    from chattune.config import build_config
    from chattune.models.methods import apply_method

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        values = {
            "model": str(tiny_model_dir),
            "train_file": "x",
            "method": "lora",
            "lora_target": "all-linear",
        }
        model = apply_method(model, build_config(values | {"lora_dropout": 0.0}))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
        return model

    loss, grads, _ = lora_step(make(), IDS)
    model = make()
    assert fuse_lora_mlps(model) == 2 and fuse_lora_linears(model) == 14
    fallbacks: list[str] = []
    for name, module in model.named_modules():
        fused = module.__dict__.get("forward")
        if isinstance(fused, (FusedLoraLinearForward, FusedLoraMlpForward)):
            original = fused.original
            fused.original = lambda *a, _o=original, _n=name, **k: fallbacks.append(_n) or _o(*a, **k)
    loss_f, grads_f, _ = lora_step(model, IDS)
    assert fallbacks == []  # the mix really ran fused
    assert torch.allclose(loss, loss_f, rtol=1e-2)
    for name, g in grads.items():
        # bf16 rounding differs in the last bit here and there; a wrong term would be off by O(1)
        assert float((grads_f[name] - g).norm() / g.norm()) < 3e-2, name
