"""Attention for packed rows: several samples in one row, each attending only to itself.

The collator passes `cu_seq_lens_q`/`cu_seq_lens_k` (sample boundaries, as flash-attention's varlen kernels
take them). On CPU, running SDPA per segment with `is_causal=True` measured faster than one padded batch or a
4D block-diagonal mask. Without boundaries (ordinary padded batches, generation) it is plain SDPA.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "chattune_packed_sdpa"


def packed_sdpa_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(batch, heads, seq, dim) attention; per-segment causal SDPA when sample boundaries are given."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    out = torch.empty_like(query)
    edges = bounds.tolist()
    for start, end in itertools.pairwise(edges):
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=p,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
    return out.transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Make the packed attention available to transformers models by name; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)  # padded batches still get masks
    return PACKED_ATTENTION
