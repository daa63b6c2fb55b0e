"""The fused RMSNorm: transformers' norm output and input gradient, with a hand-written backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import DTYPES, relative_error
from tests.models.conftest import LoraNumerics, assert_same_step, record_fallbacks
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from chattune.models.fused_mlp import fuse_lora_mlps
from chattune.models.fused_norm import FusedRmsNormForward, fuse_rms_norms, rms_norm

IDS = torch.randint(0, 50, (4, 48), generator=torch.Generator().manual_seed(0))


def _norm(dtype: torch.dtype, width: int = 64) -> LlamaRMSNorm:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype).requires_grad_(False)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)  # not all ones, so that a misplaced weight shows
    return norm


def _forward_backward(fn, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("shape", [(2, 7, 64), (5, 64)])
def test_same_output_and_input_gradient_as_llama_rms_norm(precision: str, shape: tuple[int, ...]) -> None:
    dtype = DTYPES[precision]
    norm = _norm(dtype)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    y_ref, dx_ref = _forward_backward(norm, x, dy)
    y, dx = _forward_backward(lambda t: rms_norm(t, norm.weight, norm.variance_epsilon), x, dy)
    assert torch.equal(y, y_ref)  # the same operations in the same order
    if precision == "fp32":
        assert torch.allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    else:  # one rounding to bf16 at the end instead of autograd's: a bf16 step (2^-8) here and there
        assert relative_error(dx, dx_ref) < 1e-2
        assert torch.allclose(dx.float(), dx_ref.float(), rtol=2e-2, atol=2e-2)


def _with_norm_weights(model):
    """The tiny model's norms scale by 1: random weights instead, so that a misplaced weight shows."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def test_same_loss_and_gradients_in_a_lora_step(
    tiny_model_dir: Path, make_lora_model, lora_step, peft_steps, numerics: LoraNumerics
) -> None:
    peft = peft_steps(tiny_model_dir, numerics, IDS, _with_norm_weights, lora_dropout=0.0)
    model = _with_norm_weights(make_lora_model(tiny_model_dir, numerics.precision, lora_dropout=0.0))
    # transformers swaps hub kernels in on every train()/eval() switch, which would drop the fused forwards:
    # fuse_rms_norms switches that off on a CPU (the assertion after the step checks the forwards survive)
    fuse_lora_mlps(model)  # as training installs them: next to the fused MLP blocks
    assert fuse_rms_norms(model) == 5  # two per layer and the final norm
    fallbacks = record_fallbacks(model, (FusedRmsNormForward,))
    fused = lora_step(model, IDS)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert all(isinstance(m.forward, FusedRmsNormForward) for m in norms)  # still in place after train()
    # the first layer's input norm sees the frozen embedding's output, which needs no gradient
    assert fallbacks == ["base_model.model.model.layers.0.input_layernorm"]
    assert_same_step(peft, fused, numerics)
    assert (
        fused[2] < peft.reference[2]
    )  # x and one rstd per row saved instead of x in fp32 and the normalised x


def test_runs_the_original_forward_where_it_does_not_apply() -> None:
    norm = _norm(torch.float32)
    assert fuse_rms_norms(norm) == 1 and fuse_rms_norms(norm) == 1  # a second call changes nothing
    fallbacks = record_fallbacks(norm, (FusedRmsNormForward,))
    x = torch.randn(3, 64, requires_grad=True)
    norm(x).sum().backward()
    assert fallbacks == []
    norm.weight.requires_grad_(True)  # a trained weight: autograd's backward gives its gradient
    norm(x).sum().backward()
    assert norm.weight.grad is not None
    norm.weight.requires_grad_(False)
    with torch.no_grad():
        norm(x)
    norm(x.detach())
    assert fallbacks == ["", "", ""]


class _GemmaLikeRMSNorm(torch.nn.Module):
    """An RMSNorm that scales by (1 + weight): not the norm the fused function computes."""

    def __init__(self, width: int):
        super().__init__()
        self.eps, self.weight = 1e-6, torch.nn.Parameter(torch.zeros(width), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def test_other_norms_keep_their_forward() -> None:
    norm = _GemmaLikeRMSNorm(64)
    assert fuse_rms_norms(norm) == 0
    assert not isinstance(norm.forward, FusedRmsNormForward)
