"""A LoRA projection `x W^T (+ bias) + s · dropout(x) A^T B^T` as one autograd function, and the pieces the
fused SwiGLU MLP (fused_mlp.py) shares with it.

peft computes the adapter as separate modules: the base output, the rank-r path, a multiplication by the
scale and an addition, each an autograd node that backward walks again (another multiply, another add, and
the rank-r weight gradients in the layout nn.Linear's backward uses, which MKL runs several times slower for
these skinny shapes). Here the scale folds into one addmm on the way forward and one on the way back, and the
rank-r products run in the fast layouts: the same saved tensors (the input and the rank-r activation) and the
same gradients. The frozen base weight (and bias) get no gradient, as under autograd.

peft keeps the adapters in fp32 over a bf16 base. On hardware with fast bf16 matmuls (GPUs, AVX-512-BF16/AMX
CPUs) the rank-r path then computes in bf16 from the fp32 weights (cast per call: r x width, tiny) and the
weight gradients come back in fp32: the input and output gradient never leave bf16, where peft converts
every activation to fp32 and back in forward and again in backward, passes that cost as much as the bf16
matmul beside them there. This is what bf16 autocast computes for the same adapters. Elsewhere (AVX2 CPUs,
fp16) the rank-r path computes in fp32 as peft's does.

Applied per layer only where the layer is a plain peft LoRA Linear (checked numerically against its own
forward when patched); anything else at run time (adapters disabled or merged, several adapters, autocast,
an input in another dtype than the base, sharded weights, no gradient needed, extra forward arguments) runs
peft's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from chattune.models import load

if TYPE_CHECKING:
    from torch.nn import Module

HALF = (torch.bfloat16, torch.float16)


def fast_bf16_matmuls(device: torch.device) -> bool:
    """bf16 matmuls run faster than fp32 on `device`: GPUs, and CPUs with AVX-512-BF16 or AMX."""
    return device.type == "cuda" or (device.type == "cpu" and load.cpu_has_fast_bf16())


def rank_dtype_for(base: torch.dtype, adapters: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the rank-r path computes in: the adapters' own, except fp32 adapters on a bf16 base where
    bf16 matmuls are fast, which compute in bf16 (fp16 keeps fp32: its gradients would need the loss scale's
    headroom in the sums over tokens)."""
    if base == torch.bfloat16 and adapters == torch.float32 and fast_bf16_matmuls(device):
        return torch.bfloat16
    return adapters


@dataclass(frozen=True)
class Adapted:
    """One projection: y = x W^T + bias + scale · dropout(x) A^T B^T, with `p` the dropout probability in use
    (peft's, quantised: see keep_mask) and `rank_dtype` the dtype the rank-r path computes in (see
    rank_dtype_for; the adapters' own when not given)."""

    w: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    p: float
    bias: torch.Tensor | None = None
    rank_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.rank_dtype is None:
            object.__setattr__(self, "rank_dtype", self.a.dtype)

    def rank_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in the rank-r path's dtype (a cast of r x width elements where it differs)."""
        return self.a.to(self.rank_dtype), self.b.to(self.rank_dtype)

    def rank_input(self, x: torch.Tensor) -> torch.Tensor:
        """The projection's input in the rank-r path's dtype (one copy, shared by projections of one input)."""
        return x.to(self.rank_dtype)

    @property
    def adapter_scale(self) -> float:
        """The adapter's scale with dropout's 1/(1-p) folded in, so that applying a mask only zeroes elements
        (one pass over a wide tensor instead of two, in forward and again in backward)."""
        return self.scale / (1 - self.p)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors a fused function reads (passed to it again so that autograd returns their gradients)."""
        return [self.w, self.a, self.b]


def adapted(layer: Any, allow_bias: bool = False) -> Adapted | None:
    """A peft LoRA Linear with one plain active adapter over a frozen nn.Linear, else None."""
    base = getattr(layer, "base_layer", None)
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    if base.bias is not None and (not allow_bias or base.bias.requires_grad):
        return None
    active = getattr(layer, "active_adapters", None)
    if not active or len(active) != 1 or layer.merged or layer.disable_adapters:
        return None
    name = active[0]
    if (
        name not in layer.lora_A
        or layer.use_dora.get(name, False)
        or name in getattr(layer, "lora_variant", {})
    ):
        return None  # DoRA and other variants compute more than the plain adapter
    dropout, a, b = layer.lora_dropout[name], layer.lora_A[name], layer.lora_B[name]
    if type(dropout) is torch.nn.Dropout:
        p = quantised(dropout.p) if dropout.training else 0.0
    elif type(dropout) is torch.nn.Identity:
        p = 0.0
    else:
        return None
    if any(type(m) is not torch.nn.Linear or m.bias is not None for m in (a, b)):
        return None
    rank_dtype = rank_dtype_for(base.weight.dtype, a.weight.dtype, base.weight.device)
    return Adapted(base.weight, a.weight, b.weight, float(layer.scaling[name]), p, base.bias, rank_dtype)


def plain_tensors(projs: list[Adapted]) -> bool:
    """Whole (unsharded) parameters, one dtype for the base weights and one for the adapters: the same, or
    fp32 adapters on a bf16/fp16 base (as peft keeps them), which take the input in fp32 as peft does."""
    base = [t for p in projs for t in (p.w, *([p.bias] if p.bias is not None else []))]
    adapters = [t for p in projs for t in (p.a, p.b)]
    if any(type(t) is not torch.nn.Parameter or t.numel() == 0 for t in base + adapters):
        return False  # sharded (DeepSpeed ZeRO-3, FSDP): the modules' own hooks must gather them
    base_dtypes, adapter_dtypes = {t.dtype for t in base}, {t.dtype for t in adapters}
    if len(base_dtypes) != 1 or len(adapter_dtypes) != 1:
        return False
    base_dtype, adapter_dtype = base_dtypes.pop(), adapter_dtypes.pop()
    return adapter_dtype == base_dtype or (adapter_dtype == torch.float32 and base_dtype in HALF)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """allclose tolerances for checking a fused function against the module it replaces."""
    return {"rtol": 2e-2, "atol": 2e-2} if dtype in HALF else {"rtol": 1e-4, "atol": 1e-5}


# Dropout probabilities come in steps of 1/MASK_LEVELS: a keep mask compares one random byte per element with
# a threshold (see keep_mask)
MASK_LEVELS = 256


def quantised(p: float) -> float:
    """The dropout probability keep_mask realises for `p`: the nearest multiple of 1/256, at most 255/256."""
    return min(round(p * MASK_LEVELS), MASK_LEVELS - 1) / MASK_LEVELS


@dataclass(frozen=True)
class KeepMask:
    """Dropout's keep decision for each element of one input: random bytes, kept where byte >= threshold.

    Kept as the bytes (one per element, what autograd's dropout keeps too) and turned into 1/0 in the dtype
    of what it multiplies when used: a multiply by a bool mask mixes dtypes, which torch's CPU kernels do
    element by element, 3-6x slower than a same-dtype multiply plus the byte-to-float conversion.
    """

    bytes: torch.Tensor
    threshold: int

    def of(self, dtype: torch.dtype) -> torch.Tensor:
        """1 where kept and 0 where dropped, in `dtype` (bytes and thresholds below 256 are exact in bf16)."""
        return self.bytes.to(dtype).ge_(self.threshold)

    @property
    def kept(self) -> torch.Tensor:
        """The mask as bools."""
        return self.bytes >= self.threshold


def keep_mask(like: torch.Tensor, p: float) -> KeepMask | None:
    """Dropout's keep mask for `like` (None when p is 0), `p` a multiple of 1/256; one byte per element.

    Each element keeps with probability exactly 1 - p from one random byte, and the bytes come eight to a
    64-bit word: the CPU generator runs serially, and `rand_like` spends one 32-bit draw (and a float) per
    element. The full signed range matters: `random_()` alone leaves every word's top bit 0.
    """
    if p == 0:
        return None
    levels = p * MASK_LEVELS
    if levels != round(levels):
        raise ValueError(f"dropout {p} is not a multiple of 1/{MASK_LEVELS}; pass quantised(p)")
    n = like.numel()
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=like.device).random_(-(2**63), None)
    return KeepMask(words.view(torch.uint8)[:n].view(like.shape), round(levels))


def masked(x: torch.Tensor, mask: KeepMask | torch.Tensor | None) -> torch.Tensor:
    """`x` with the elements that `mask` drops zeroed: dropout without its 1/(1-p) (see adapter_scale);
    `mask` as a KeepMask, or already as 1/0 in x's dtype."""
    if mask is None:
        return x
    return x * (mask.of(x.dtype) if isinstance(mask, KeepMask) else mask)


def t_mm(wide: torch.Tensor, skinny: torch.Tensor) -> torch.Tensor:
    """wide^T @ skinny for (n, w) and (n, r) with small r, as (skinny^T wide)^T.

    The direct product reads `wide` transposed, a layout MKL ran 3-7x slower for these shapes (a rank-8 LoRA
    gradient took longer than the 576 x 1536 base matmul beside it); contiguous because it becomes a .grad.
    """
    return (skinny.T @ wide).T.contiguous()


def mm_t(wide: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """wide @ weight for (n, w) and (w, r) with small r, as (weight^T wide^T)^T (2x faster here, as above)."""
    return (weight.T @ wide.T).T


def lora_forward(
    x: torch.Tensor, proj: Adapted, mask: KeepMask | None, x_rank: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + bias + s' (mask x A^T) B^T, mask x A^T) for 2-D x, s' the adapter scale with dropout's;
    `x_rank` is x in the rank-r dtype where the caller has it already."""
    base = x @ proj.w.T if proj.bias is None else torch.addmm(proj.bias, x, proj.w.T)
    return adapter_forward(base, x, proj, mask, x_rank)


def adapter_forward(
    base: torch.Tensor, x: torch.Tensor, proj: Adapted, mask: KeepMask | None, x_rank: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base output `base` (x W^T + bias) with the adapter's term added, and mask x A^T.

    A rank-r path in fp32 over a half-precision base takes x in fp32 and adds to the base output in fp32
    before rounding it back, as peft's forward does.
    """
    a, b = proj.rank_weights()
    xa = masked(proj.rank_input(x) if x_rank is None else x_rank, mask) @ a.T
    scale = proj.adapter_scale
    if proj.rank_dtype == base.dtype:
        return base.addmm_(xa, b.T, alpha=scale), xa
    return torch.addmm(base.to(proj.rank_dtype), xa, b.T, alpha=scale).to(base.dtype), xa


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    proj: Adapted,
    mask: KeepMask | None,
    need_dx: bool,
    x_rank: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) of one projection given its output gradient, input and rank-r activation (mask x A^T);
    dA and dB in the adapters' dtype whatever the rank-r path computed in."""
    return adapter_backward(dy, x, xa, proj, mask, dy @ proj.w if need_dx else None, x_rank)


def adapter_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    proj: Adapted,
    mask: KeepMask | None,
    dx: torch.Tensor | None,
    x_rank: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) given the base path's input gradient `dx` (dy W, None when x needs none), to which the
    adapter's is added."""
    wide, scale = dy.to(proj.rank_dtype), proj.adapter_scale
    a, b = proj.rank_weights()
    dyb = mm_t(wide, b)
    x_rank = proj.rank_input(x) if x_rank is None else x_rank
    ones = None if mask is None else mask.of(proj.rank_dtype)  # used twice below
    d_a = (dyb.T @ masked(x_rank, ones)).to(proj.a.dtype).mul_(scale)
    d_b = t_mm(wide, xa).to(proj.b.dtype).mul_(scale)
    if dx is None:
        return None, d_a, d_b
    if dyb.dtype == dx.dtype:
        if ones is None:
            return dx.addmm_(dyb, a, alpha=scale), d_a, d_b
        return dx.addcmul_(dyb @ a, ones, value=scale), d_a, d_b  # one pass: mask, scale and sum
    # a rank-r path in fp32 on a half base: the adapter's term in fp32, rounded once, as peft adds it
    return dx.add_(masked(dyb @ a, ones).mul_(scale).to(dx.dtype)), d_a, d_b


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, proj: Adapted, *weights: torch.Tensor) -> torch.Tensor:
        mask = keep_mask(x, proj.p)
        y, xa = lora_forward(x, proj, mask)
        ctx.proj, ctx.mask = proj, mask
        ctx.save_for_backward(x, xa)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, xa = ctx.saved_tensors
        dx, d_a, d_b = lora_backward(dy, x, xa, ctx.proj, ctx.mask, ctx.needs_input_grad[0])
        return dx, None, None, d_a, d_b


class FusedLoraLinearForward:
    """The replacement `forward` of one LoRA Linear: the fused function when it applies, else peft's."""

    def __init__(self, layer: Any, original: Any):
        self.layer, self.original = layer, original

    def projection(self) -> Adapted | None:
        """The layer as one plain projection with unsharded weights of one dtype, else None."""
        proj = adapted(self.layer, allow_bias=True)
        return proj if proj is not None and plain_tensors([proj]) else None

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        proj = self.projection() if torch.is_grad_enabled() and not (args or kwargs) else None
        if proj is None or torch.is_autocast_enabled(x.device.type) or x.dtype != proj.w.dtype:
            return self.original(x, *args, **kwargs)
        y = _LoraLinear.apply(x.reshape(-1, x.shape[-1]), proj, *proj.tensors())
        return y.reshape(*x.shape[:-1], y.shape[-1])


@torch.no_grad()
def _agrees(fused: FusedLoraLinearForward) -> bool:
    """The fused computation gives the layer's own output on a random input."""
    proj = fused.projection()
    if proj is None:
        return False
    x = torch.randn(3, proj.w.shape[1], dtype=proj.w.dtype, device=proj.w.device)
    was_training = fused.layer.training
    fused.layer.eval()  # no dropout on either side
    try:
        expected = fused.original(x)
    finally:
        fused.layer.train(was_training)
    got = lora_forward(x, replace(proj, p=0.0), None)[0]
    return expected.shape == got.shape and torch.allclose(expected, got, **tolerance(x.dtype))


def install(modules: Iterable[Any], wrapper: type, agrees: Callable[[Any], bool]) -> int:
    """Give each module the forward `wrapper(module, module.forward)` where `agrees` accepts it (modules that
    already have one keep it); returns how many have it."""
    count = 0
    for module in modules:
        if isinstance(module.forward, wrapper):
            count += 1
        elif agrees(fused := wrapper(module, module.forward)):
            module.forward = fused  # this instance only
            count += 1
    return count


def fuse_lora_linears(model: Module) -> int:
    """Give every plain LoRA Linear the fused forward; returns how many have it.

    Those inside a fused MLP block get it too: the block's own function bypasses them, and they serve
    whenever the block falls back to its original forward.
    """
    layers = (m for m in model.modules() if adapted(m, allow_bias=True) is not None)
    return install(layers, FusedLoraLinearForward, _agrees)
