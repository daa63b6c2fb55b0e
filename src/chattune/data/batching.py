"""Batches: pad each micro-batch to its longest sample (labels padded with -100, never learnt)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chattune.data.templates import IGNORE_INDEX


@dataclass
class PadCollator:
    """Right-pads input_ids with the pad id, labels with -100, and builds the attention mask."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class EpochSeededLengthGroupedSampler:
    """Length-grouped order that depends only on (seed, epoch), so a resumed run sees the same batches.

    transformers' LengthGroupedSampler draws from the global RNG at iteration time, whose state after a resume
    differs from the uninterrupted run's.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths, self.group_size, self.seed, self.epoch = lengths, group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at the start of each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=g))


@dataclass
class PackedCollator:
    """Concatenates a micro-batch into one row without padding: positions restart per sample, and sample
    boundaries travel as `cu_seq_lens` so attention never crosses them (see models.attention)."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, positions, bounds = [], [], [], [0]
        for r in rows:
            n = len(r["input_ids"])
            ids.extend(r["input_ids"])
            row_labels = list(r["labels"])
            row_labels[0] = IGNORE_INDEX  # never predicted from the previous sample's last token
            labels.extend(row_labels)
            positions.extend(range(n))
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = max(len(r["input_ids"]) for r in rows)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }
