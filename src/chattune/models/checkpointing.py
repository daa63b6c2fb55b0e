"""Selective activation checkpointing: recompute only the MLP blocks in the backward pass.

In a SwiGLU decoder the MLP keeps most of the activations autograd saves (gate, up, the activation and
their product: four tensors of the intermediate width per token, against the attention's few of the hidden
width). Recomputing just the MLPs frees most of that memory for about half the extra time of recomputing
whole layers (`gradient_checkpointing: true`); bench/README.md has both measured.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from chattune.errors import ConfigError

if TYPE_CHECKING:
    from torch.nn import Module

# the attribute name of the MLP block in Llama, Qwen, Mistral, Gemma, GPT-2, ChatGLM... decoder layers
MLP_NAME = "mlp"


def _recomputed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # eval and generation: nothing is saved anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_mlps(model: Module) -> int:
    """Make every MLP block of `model` recompute its activations in backward; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != MLP_NAME:
            continue
        if not isinstance(module.forward, functools.partial):  # not wrapped yet
            module.forward = functools.partial(_recomputed, module.forward)  # this instance only
        count += 1
    if count == 0:
        raise ConfigError(
            f"gradient_checkpointing: mlp found no '{MLP_NAME}' blocks in {type(model).__name__}; "
            "use gradient_checkpointing: true (whole layers) instead"
        )
    return count
