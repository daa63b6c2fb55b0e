"""A SwiGLU MLP whose three projections carry LoRA adapters, as one autograd function.

Autograd keeps four tensors of the intermediate width per token for `down(silu(gate(x)) * up(x))`: gate's
output (for silu), silu's output and up's output (for the product), and the product (for down's adapter).
The last two are cheap elementwise results of the first two, so this function saves only gate's and up's
outputs (plus the input, the rank-r adapter activations and, with LoRA dropout, one-byte keep masks) and
recomputes the rest in backward: about a quarter less activation memory for a LoRA run, with the same
matmuls and the same gradients. The frozen base weights get no gradient, so their weight-gradient matmuls
are skipped, as autograd would.

Applied per MLP block only where the structure is exactly that (checked numerically against the block's own
forward when patched); any other case at run time (adapters disabled or merged, autocast, an input in another
dtype than the base, sharded weights, no gradient needed) runs the block's original forward. fp32 adapters on
a bf16 base (peft's default) are fused too, their rank-r path in bf16 where bf16 matmuls are fast and in fp32
elsewhere (see fused_lora); gate and up convert their shared input once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from chattune.models.checkpointing import MLP_NAME
from chattune.models.fused_lora import (
    Adapted,
    adapted,
    install,
    keep_mask,
    lora_backward,
    lora_forward,
    plain_tensors,
    tolerance,
)

if TYPE_CHECKING:
    from torch.nn import Module

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _swiglu(x: torch.Tensor, gate: Adapted, up: Adapted, down: Adapted, masks: list) -> tuple:
    """The block's output and what backward needs: (y, gate out, up out, the three dropout(x) A^T)."""
    masks[0:2] = keep_mask(x, gate.p), keep_mask(x, up.p)
    x_rank = gate.rank_input(x)  # gate and up read the same input: one conversion where there is one
    g, xag = lora_forward(x, gate, masks[0], x_rank)
    u, xau = lora_forward(x, up, masks[1], x_rank)
    h = F.silu(g).mul_(u)
    masks[2] = keep_mask(h, down.p)
    y, had = lora_forward(h, down, masks[2])
    return y, g, u, xag, xau, had


class _LoraSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, projs: tuple[Adapted, ...], *weights: torch.Tensor):
        # `weights` are the projections' tensors again, passed so that autograd returns their gradients
        masks: list = [None, None, None]
        y, g, u, xag, xau, had = _swiglu(x, *projs, masks)
        ctx.projs, ctx.masks = projs, masks
        ctx.save_for_backward(x, g, u, xag, xau, had)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, g, u, xag, xau, had = ctx.saved_tensors
        gate, up, down = ctx.projs
        mask_g, mask_u, mask_d = ctx.masks
        sig = torch.sigmoid(g)
        act = g * sig
        # down: y = h Wd^T + s (dropout(h) Ad^T) Bd^T, with h = silu(g) * u recomputed
        dh, d_ad, d_bd = lora_backward(dy, act * u, had, down, mask_d, True)
        du = dh * act
        # silu'(g) = sig (1 + g (1 - sig))
        dg = dh.mul_(u).mul_(sig * (1 + g * (1 - sig)))
        del act, sig
        grads: list = []
        parts = []
        x_rank = gate.rank_input(x)
        for d, xa, proj, mask in ((dg, xag, gate, mask_g), (du, xau, up, mask_u)):
            part, d_a, d_b = lora_backward(d, x, xa, proj, mask, ctx.needs_input_grad[0], x_rank)
            grads += [None, d_a, d_b]
            parts.append(part)
        dx = parts[0].add_(parts[1]) if ctx.needs_input_grad[0] else None
        return dx, None, *grads, None, d_ad, d_bd


class FusedLoraMlpForward:
    """The replacement `forward` of one MLP block: the fused function when it applies, else the original."""

    def __init__(self, module: Any, original: Any):
        self.module, self.original = module, original

    def projections(self) -> tuple[Adapted, Adapted, Adapted] | None:
        """Gate, up and down while each is a plain LoRA layer with unsharded weights of one dtype."""
        projs = [adapted(getattr(self.module, name, None)) for name in PROJECTIONS]
        if any(p is None for p in projs) or not plain_tensors(projs):  # type: ignore[arg-type]
            return None
        return tuple(projs)  # type: ignore[return-value]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        projs = self.projections() if torch.is_grad_enabled() else None
        if projs is None or torch.is_autocast_enabled(x.device.type) or x.dtype != projs[0].w.dtype:
            return self.original(x)
        weights = [t for p in projs for t in p.tensors()]
        y = _LoraSwiGLU.apply(x.reshape(-1, x.shape[-1]), projs, *weights)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _is_swiglu(module: Any) -> bool:
    """gate/up/down projections and a SiLU activation (transformers has its own SiLU class)."""
    act = getattr(module, "act_fn", None)
    if not callable(act) or not all(hasattr(module, p) for p in PROJECTIONS):
        return False
    probe = torch.linspace(-6, 6, 25)
    return torch.allclose(act(probe), F.silu(probe))


@torch.no_grad()
def _agrees(fused: FusedLoraMlpForward) -> bool:
    """The fused forward gives the block's own output on a random input (the structure is what we assume)."""
    projs = fused.projections()
    if projs is None:
        return False
    w = projs[0].w
    x = torch.randn(3, w.shape[1], dtype=w.dtype, device=w.device)
    no_dropout = [replace(p, p=0.0) for p in projs]
    was_training = fused.module.training
    fused.module.eval()  # the original forward without dropout, to compare like with like
    try:
        expected = fused.original(x)
    finally:
        fused.module.train(was_training)
    got = _swiglu(x, *no_dropout, [None, None, None])[0]
    return expected.shape == got.shape and torch.allclose(expected, got, **tolerance(x.dtype))


def fuse_lora_mlps(model: Module) -> int:
    """Give every SwiGLU MLP block whose projections all carry a plain LoRA adapter the fused forward."""
    blocks = (m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == MLP_NAME and _is_swiglu(m))
    return install(blocks, FusedLoraMlpForward, _agrees)
