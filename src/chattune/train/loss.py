"""Causal-LM loss that runs the output head only on trained positions.

The head is a large matmul (~21% of SmolLM2-135M's FLOPs, most of a tiny model's), and full-vocabulary logits
for every padded position dominate memory. Gathering the hidden states of trained positions first gives the
same loss and gradients for a fraction of the cost.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from chattune.data.templates import IGNORE_INDEX

# architectures that transform logits after the head (soft-capping, scaling) keep the stock path
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def split_backbone_and_head(model: Any) -> tuple[Any, Any] | None:
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
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = hidden[:, :-1][keep]
    logits = head(picked).float()
    total = F.cross_entropy(logits, targets[keep], reduction="sum")
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator
