"""The fused LoRA projection: the same loss and gradients as peft's modules, bias and dropout included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import save_tiny_llama
from tests.models.conftest import LoraNumerics, assert_same_step, record_fallbacks, record_masks

from chattune.models import fused_lora, load
from chattune.models.fused_lora import FusedLoraLinearForward, fuse_lora_linears
from chattune.models.fused_mlp import FusedLoraMlpForward, fuse_lora_mlps

IDS = torch.randint(0, 50, (4, 48), generator=torch.Generator().manual_seed(0))
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


FUSED = (FusedLoraLinearForward, FusedLoraMlpForward)


@pytest.mark.parametrize("with_mlp", [False, True])
def test_same_loss_and_gradients(
    tiny_model_dir: Path, make_lora_model, lora_step, peft_steps, with_mlp: bool, numerics: LoraNumerics
) -> None:
    peft = peft_steps(tiny_model_dir, numerics, IDS, lora_dropout=0.0)
    model = make_lora_model(tiny_model_dir, numerics.precision, lora_dropout=0.0)
    if with_mlp:
        assert fuse_lora_mlps(model) == 2
    assert fuse_lora_linears(model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    fallbacks = record_fallbacks(model, FUSED)
    fused = lora_step(model, IDS)
    assert fallbacks == []  # every layer really ran fused, fp32 adapters on a bf16 base included
    half = torch.bfloat16 if numerics.half_rank else torch.float32
    ranks = {fused_lora.adapted(m).rank_dtype for m in model.modules() if fused_lora.adapted(m) is not None}
    assert ranks == {half}
    assert any("q_proj" in name for name in fused[1])
    assert_same_step(peft, fused, numerics)
    assert fused[2] <= peft.reference[2]  # no more saved for backward than peft's modules


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    """The tiny Llama with biases on q/k/v/o (as Qwen2 has on q/k/v)."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-bias"), chatml_tokenizer, 1, attention_bias=True
    )


def test_frozen_bias(
    biased_model_dir: Path, make_lora_model, lora_step, peft_steps, numerics: LoraNumerics
) -> None:
    peft = peft_steps(biased_model_dir, numerics, IDS, lora_dropout=0.0)
    model = make_lora_model(biased_model_dir, numerics.precision, lora_dropout=0.0)
    assert fuse_lora_linears(model) == 14
    fallbacks = record_fallbacks(model, FUSED)
    assert_same_step(peft, lora_step(model, IDS), numerics)
    assert fallbacks == []


def test_lora_dropout_gives_peft_gradients_for_the_same_masks(
    tiny_model_dir: Path,
    make_lora_model,
    lora_step,
    peft_steps,
    replay_masks,
    monkeypatch,
    numerics: LoraNumerics,
) -> None:
    settings = {"lora_dropout": 0.3, "lora_target": list(ATTENTION)}
    model = make_lora_model(tiny_model_dir, numerics.precision, **settings)
    assert fuse_lora_linears(model) == 8
    drawn = record_masks(monkeypatch, fused_lora)
    fused = lora_step(model, IDS)
    assert len(drawn) == 8 and 0.6 < float(torch.cat([m.flatten() for m in drawn]).float().mean()) < 0.8

    # drawn in forward order (q, k, v, o per layer), at 0.3 quantised to 77/256 and scaled by 256/179
    replay = lambda reference: replay_masks(reference, drawn, ATTENTION, 77 / 256)  # noqa: E731
    assert_same_step(peft_steps(tiny_model_dir, numerics, IDS, replay, **settings), fused, numerics)
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


def test_dropout_is_quantised_to_steps_of_1_256() -> None:
    assert fused_lora.quantised(0.1) == 26 / 256 and fused_lora.quantised(0.05) == 13 / 256
    assert fused_lora.quantised(0.3) == 77 / 256 and fused_lora.quantised(26 / 256) == 26 / 256
    assert fused_lora.quantised(0.001) == 0 and fused_lora.quantised(0.999) == 255 / 256  # never all dropped
    assert fused_lora.keep_mask(torch.ones(3), 0.0) is None
    with pytest.raises(ValueError, match="quantised"):
        fused_lora.keep_mask(torch.ones(3), 0.1)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9, 255 / 256])
def test_keep_masks_keep_one_minus_the_quantised_p(p: float) -> None:
    """Every element keeps with probability 1 - p_q, whichever byte of its 64-bit word it comes from, and
    dropout then has expectation x: checked within 5 binomial standard deviations over 2^23 elements, which
    tells p_q = 26/256 from 0.1 (15 sigma apart) and catches a word whose top bit is never set."""
    torch.manual_seed(0)
    p_q = fused_lora.quantised(p)
    like = torch.empty(2**20 + 3, 8, dtype=torch.bfloat16)  # not a whole number of words
    drawn = fused_lora.keep_mask(like, p_q)
    mask = drawn.kept
    assert mask.dtype == torch.bool and mask.shape == like.shape
    for dtype in (torch.float32, torch.bfloat16):  # the 1/0 form the functions multiply by
        assert torch.equal(drawn.of(dtype), mask.to(dtype))
    n, sigma = like.numel(), (p_q * (1 - p_q)) ** 0.5
    assert abs(float(mask.float().mean()) - (1 - p_q)) < 5 * sigma / n**0.5
    per_byte = mask[: 2**20].reshape(-1, 8).float().mean(0)  # element i came from byte i % 8 of a word
    assert (per_byte - (1 - p_q)).abs().max() < 5 * sigma / (n / 8) ** 0.5, per_byte
    # the functions scale the kept elements by 1/(1-p_q) in the adapter's scale
    scale = fused_lora.Adapted(like, like, like, 1.0, p_q).adapter_scale
    mean = float(mask.double().mean()) * scale
    assert abs(mean - 1) < 5 * (p_q / (1 - p_q)) ** 0.5 / n**0.5


def test_rank_path_in_bf16_only_for_fp32_adapters_on_bf16_where_bf16_matmuls_are_fast(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for fast_cpu in (False, True):
        monkeypatch.setattr(load, "cpu_has_fast_bf16", lambda fast=fast_cpu: fast)
        assert fused_lora.rank_dtype_for(bf16, fp32, cpu) == (bf16 if fast_cpu else fp32)
        assert fused_lora.rank_dtype_for(bf16, fp32, cuda) == bf16
        # fp16 keeps the fp32 rank-r path (loss-scaled gradients); same-dtype adapters compute in their own
        assert fused_lora.rank_dtype_for(fp16, fp32, cuda) == fp32
        assert fused_lora.rank_dtype_for(fp32, fp32, cuda) == fp32
        assert fused_lora.rank_dtype_for(bf16, bf16, cpu) == bf16
