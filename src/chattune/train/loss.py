"""Causal-LM loss that runs the output head only on trained positions.

The head is a large matmul (~21% of SmolLM2-135M's FLOPs, most of a tiny model's), and full-vocabulary logits
for every padded position dominate memory. Gathering the hidden states of trained positions first gives the
same loss and gradients for a fraction of the cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from chattune.compat.transformers import attention_implementation
from chattune.data.templates import IGNORE_INDEX

if TYPE_CHECKING:
    from torch.nn import Module

# rows of hidden states per head chunk: 256 x a 49k vocabulary is 50 MB of fp32 logits at a time
HEAD_CHUNK = 256

# architectures that transform logits after the head (soft-capping, scaling) keep the stock path
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def split_backbone_and_head(model: Module) -> tuple[Any, Any] | None:
    """(backbone, output head) when the loss can be computed from hidden states safely, else None."""
    inner = model
    if hasattr(model, "peft_config"):
        if str(model.active_peft_config.peft_type) not in ("LORA", "PeftType.LORA"):
            return None  # prompt-learning methods inject past key values in the PEFT wrapper's forward
        inner = model.base_model.model
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is inner:
        return None
    return backbone, head


def trained_positions_loss(
    backbone: Any,
    head: Any,
    inputs: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None,
) -> torch.Tensor:
    """Summed cross-entropy over trained positions, divided by the trained-token count of the whole step."""
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels",)}
    if causal_suffices(backbone, kwargs.get("attention_mask")):
        del kwargs["attention_mask"]
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = hidden[:, :-1][keep]
    total = head_cross_entropy(head, picked, targets[keep])
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def causal_suffices(backbone: Any, mask: torch.Tensor | None) -> bool:
    """Whether a padding mask can be dropped because causal attention alone gives the same result.

    In a right-padded batch every real token precedes the row's pads, so causal attention never lets it see
    one; the pads' own outputs are never trained on. Without a mask, SDPA takes its causal kernel, which skips
    the upper triangle, instead of a dense masked one (attention measured ~10% of a LoRA step on CPU).
    flash-attention keeps the mask: it uses it to skip the pads altogether.
    """
    if mask is None or mask.dim() != 2 or mask.shape[1] < 2:
        return False
    config = getattr(backbone, "config", None)
    implementation = attention_implementation(config) if config is not None else ""
    if "flash" in implementation:
        return False
    return bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())


def head_cross_entropy(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets`, never holding all the logits at once."""
    plain = type(head) is torch.nn.Linear and head.bias is None
    if not plain:  # a quantized or adapted head: its own forward, full logits
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    if not (torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)):
        return sum(
            (
                F.cross_entropy(F.linear(h, head.weight).float(), t, reduction="sum")
                for h, t in zip(hidden.split(HEAD_CHUNK), targets.split(HEAD_CHUNK), strict=True)
            ),
            start=hidden.new_zeros((), dtype=torch.float32),
        )
    return _ChunkedHeadCrossEntropy.apply(hidden, head.weight, targets)


def cross_entropy_and_grad_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `logits` against `targets` (in fp32) and its gradient for the logits,
    softmax - one_hot(target), in the logits' dtype: computed in place over fp32 logits (which it destroys).

    Five passes over the chunk (max, subtract and exp in place, sum, divide), one fewer than logsumexp followed
    by exp(logits - lse), and no chunk-sized temporary (logsumexp allocates one): this part measured 1.6x
    faster in fp32 and 1.5x in bf16 on one AVX2 core with tcmalloc, 2-3x with glibc's malloc, whose fresh
    temporaries page-fault (bench/elementwise.py, region `loss`); 15% faster than log_softmax then exp_.
    """
    dtype = logits.dtype
    logits = logits.float()
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    peak = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(peak).exp_()
    sums = probs.sum(dim=-1, keepdim=True)
    total = (peak + sums.log()).squeeze(1).sub_(picked).sum()
    probs.div_(sums)
    probs[torch.arange(targets.shape[0], device=targets.device), targets] -= 1.0
    return total, probs.to(dtype)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Head matmul + cross-entropy chunk by chunk, with the gradients computed in the forward pass.

    Autograd would keep the full (tokens x vocabulary) logits alive until backward (~300 MB per step for
    SmolLM2 at batch 8 x 256) and allocate as much again for their gradient. Here each chunk's logits turn
    into gradients for the hidden states (and the head weight, when it trains) at once and are freed; the
    backward pass only scales what was stored. The FLOPs are the same as the stock path's.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], HEAD_CHUNK):
            h = hidden[start : start + HEAD_CHUNK]
            t = targets[start : start + HEAD_CHUNK]
            chunk_total, probs = cross_entropy_and_grad_(F.linear(h, weight), t)
            total += chunk_total
            if grad_hidden is not None:
                grad_hidden[start : start + HEAD_CHUNK] = probs @ weight
            if grad_weight is not None:
                grad_weight.addmm_(probs.T.float(), h.float())
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight)))
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None,
            (grad_weight * grad_total).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None,
            None,
        )
