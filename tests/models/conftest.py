"""Helpers for the models tests: a LoRA-wrapped tiny model and one measured training step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from chattune.config import build_config
from chattune.models.methods import apply_method


@pytest.fixture
def make_lora_model() -> Callable[..., Any]:
    """Builds the tiny model with LoRA on all linear layers, B initialised so the adapters matter."""

    def make(model_dir: Path, **settings: Any) -> Any:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        values = {"model": str(model_dir), "train_file": "x", "method": "lora", "lora_target": "all-linear"}
        model = apply_method(model, build_config(values | settings))
        for name, p in model.named_parameters():  # B starts at zero, which would hide a wrong gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        return model

    return make


@pytest.fixture
def lora_step() -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor], int]]:
    """One forward/backward: the loss, the trainable parameters' gradients and the bytes saved for backward."""

    def step(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        activations = sum(n for ptr, n in saved.items() if ptr not in weights)
        return loss.detach(), grads, activations

    return step


class FixedMask(torch.nn.Module):
    """Dropout with a given keep mask, to replay the masks a fused run drew through peft's modules."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.reshape(x.shape) / (1 - self.p)


@pytest.fixture
def replay_masks() -> Callable[[Any, list[torch.Tensor], tuple[str, ...], float], None]:
    """Gives the LoRA layers named `names` (in module order) the recorded keep masks as their dropout."""

    def replay(model: Any, masks: list[torch.Tensor], names: tuple[str, ...], p: float) -> None:
        drawn = iter(masks)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in names:
                module.lora_dropout["default"] = FixedMask(next(drawn), p)
        assert next(drawn, None) is None, "more masks drawn than layers replayed"

    return replay
