"""Helpers for the models tests: a LoRA-wrapped tiny model and one measured training step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import DTYPES, relative_error
from transformers import AutoModelForCausalLM

from chattune.config import build_config
from chattune.models.methods import apply_method


@pytest.fixture
def make_lora_model() -> Callable[..., Any]:
    """Builds the tiny model with LoRA on all linear layers, B initialised so the adapters matter.

    `precision` is the base model's: in bf16 the adapters stay fp32, as peft keeps them and chattune trains.
    """

    def make(model_dir: Path, precision: str = "fp32", **settings: Any) -> Any:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[precision])
        values = {"model": str(model_dir), "train_file": "x", "method": "lora", "lora_target": "all-linear"}
        model = apply_method(model, build_config(values | settings))
        for name, p in model.named_parameters():  # B starts at zero, which would hide a wrong gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
        return model

    return make


def assert_same_step(reference: tuple, fused: tuple, precision: str) -> None:
    """The fused step's loss and gradients are peft's: to the last bits in fp32, to bf16 rounding in bf16.

    fp32: element-wise, rtol 1e-4 (sums in other orders). bf16 base with fp32 adapters: the forward computes
    as peft does (adapter path in fp32, added before rounding), measured bit-equal losses, held to 1e-5; the
    backward rounds the base path's gradients to bf16 in its own places, so elements move by a bf16 step
    (2^-8) here and there: measured 7e-3 relative at most per gradient (norm), held to 2e-2. A wrong or
    missing term is off by O(1).
    """
    (loss, grads, _), (loss_f, grads_f, _) = reference, fused
    assert grads.keys() == grads_f.keys()
    if precision == "fp32":
        assert torch.allclose(loss, loss_f, rtol=1e-6)
        for name in grads:
            assert torch.allclose(grads[name], grads_f[name], rtol=1e-4, atol=1e-7), name
        return
    assert torch.allclose(loss, loss_f, rtol=1e-5)
    errors = {name: relative_error(grads_f[name], grads[name]) for name in grads}
    assert max(errors.values()) < 2e-2, sorted(errors.items(), key=lambda e: -e[1])[:3]


def record_fallbacks(model: Any, kinds: tuple[type, ...]) -> list[str]:
    """The names of fused modules (of `kinds`) that fall back to peft's forward from now on, as they do."""
    fallbacks: list[str] = []
    for name, module in model.named_modules():
        fused = module.__dict__.get("forward")
        if isinstance(fused, kinds):
            original = fused.original
            fused.original = lambda *a, _o=original, _n=name, **k: fallbacks.append(_n) or _o(*a, **k)
    return fallbacks


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
