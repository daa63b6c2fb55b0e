"""Attention for packed rows: several samples in one row, each attending only to itself.

The collator passes `cu_seq_lens_q`/`cu_seq_lens_k` (sample boundaries, as flash-attention's varlen kernels
take them). On CPU, running SDPA per segment with `is_causal=True` measured faster than one padded batch or a
4D block-diagonal mask. On CUDA the whole row goes through one variable-length kernel instead: FlexAttention
with a document mask (compiled), which skips the blocks across samples; a per-segment loop there would launch
kernels per sample. Without boundaries (ordinary padded batches, generation) it is plain SDPA.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "chattune_packed_sdpa"
log = logging.getLogger("chattune.models")


def document_ids(bounds: torch.Tensor) -> torch.Tensor:
    """For each position of a packed row, the index of the sample it belongs to (`bounds`: cu_seq_lens)."""
    samples = torch.arange(len(bounds) - 1, device=bounds.device)
    return torch.repeat_interleave(samples, bounds.diff())


def flex_packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: torch.Tensor,
    scaling: float | None,
    gqa: bool,
    compiled: bool = True,
) -> torch.Tensor:
    """Causal attention within each sample of one packed row, in one FlexAttention call with a document mask.

    (1, heads, seq, dim) in and out. `compiled` false runs FlexAttention eagerly (slow; the CPU reference).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(bounds.to(query.device))

    def same_sample_causal(b: Any, h: Any, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (doc[q] == doc[kv]) & (q >= kv)

    length = query.shape[2]
    mask = create_block_mask(same_sample_causal, None, None, length, length, device=query.device)
    attend = _compiled_flex() if compiled else _eager_flex()
    return attend(query, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa)


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    # packed rows differ in length: a dynamic compile serves them all instead of one graph per length
    return torch.compile(flex_attention, dynamic=True)


def _eager_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


_flex_failed = False


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
    global _flex_failed
    if query.is_cuda and p == 0.0 and not _flex_failed:  # FlexAttention has no attention dropout
        try:
            out = flex_packed_attention(query, key, value, bounds, scaling, gqa)
            return out.transpose(1, 2).contiguous(), None
        except (
            Exception
        ) as e:  # a torch or GPU without FlexAttention support: the per-sample loop still works
            _flex_failed = True
            log.warning("FlexAttention failed (%s); packed rows use per-sample attention instead", e)
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

    from chattune.compat.transformers import attention_registered

    if not attention_registered(PACKED_ATTENTION):
        AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)  # padded batches still get masks
    return PACKED_ATTENTION
