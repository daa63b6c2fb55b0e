"""Helpers for the models tests: a LoRA-wrapped tiny model and one measured training step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import DTYPES, relative_error
from transformers import AutoModelForCausalLM

from chattune.config import build_config
from chattune.models import fused_lora
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


@dataclass(frozen=True)
class LoraNumerics:
    """The base model's precision in a fused-LoRA test, and whether the rank-r path computes in bf16."""

    precision: str
    half_rank: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


@pytest.fixture(
    params=[LoraNumerics("fp32"), LoraNumerics("bf16"), LoraNumerics("bf16", half_rank=True)],
    ids=["fp32", "bf16", "bf16-half-rank"],
)
def numerics(request, monkeypatch) -> LoraNumerics:
    """fp32; a bf16 base with the fp32 adapters' rank-r path in fp32 (as on AVX2 CPUs, where bf16 matmuls are
    slow); and the same with the rank-r path in bf16 (as on GPUs and AVX-512-BF16/AMX CPUs). Every machine
    runs all three."""
    half = request.param.half_rank
    monkeypatch.setattr(fused_lora, "fast_bf16_matmuls", lambda device: half)
    return request.param


@dataclass(frozen=True)
class PeftSteps:
    """peft's own step on the model a fused step ran (`reference`) and, where the fused step computes the
    rank-r path in bf16, the same model's step in fp32 (`exact`) to measure both against."""

    reference: tuple
    exact: tuple | None = None


@pytest.fixture
def peft_steps(make_lora_model, lora_step) -> Callable[..., PeftSteps]:
    """peft's steps for `assert_same_step`; `prepare` runs on each model before its step (replaying masks)."""

    def steps(
        model_dir: Path,
        numerics: LoraNumerics,
        ids: torch.Tensor,
        prepare: Callable = lambda m: None,
        **settings,
    ) -> PeftSteps:
        runs = []
        for precision in [numerics.precision] + (["fp32"] if numerics.half_rank else []):
            model = make_lora_model(model_dir, precision, **settings)
            prepare(model)
            runs.append(lora_step(model, ids))
        return PeftSteps(*runs)

    return steps


def _max_error(step: tuple, exact: tuple) -> float:
    return max(relative_error(step[1][name], grad) for name, grad in exact[1].items())


def assert_same_step(peft: PeftSteps, fused: tuple, numerics: LoraNumerics) -> None:
    """The fused step's loss and gradients are peft's: to the last bits in fp32, to bf16 rounding in bf16.

    fp32: element-wise, rtol 1e-4 (sums in other orders). bf16 base with the rank-r path in fp32: the forward
    computes as peft does (adapter path in fp32, added before rounding), measured bit-equal losses, held to
    1e-5; the backward rounds the base path's gradients to bf16 in its own places, so elements move by a bf16
    step (2^-8) here and there: measured 7e-3 relative at most per gradient (norm), held to 2e-2.

    The rank-r path in bf16 rounds the adapter's activations and gradients to bf16 as well, as bf16 autocast
    does. Where a gradient is a sum that cancels (attention keys' and queries' with biases: a shift of every
    key changes no softmax) that rounding shows: measured against the fp32 model, the worst gradient is off by
    6.3% fused, 5.1% for peft on the bf16 base and 7.1% for peft under bf16 autocast (1.2-1.4% for all three
    without biases). So it is held to the fp32 model as closely as peft's bf16 step is, within 1.5x + 5e-3,
    with the loss within 1e-4. A wrong or missing term is off by O(1).
    """
    reference, (loss_f, grads_f, _) = peft.reference, fused
    loss, grads, _ = reference
    assert grads.keys() == grads_f.keys()
    if numerics.precision == "fp32":
        assert torch.allclose(loss, loss_f, rtol=1e-6)
        for name in grads:
            assert torch.allclose(grads[name], grads_f[name], rtol=1e-4, atol=1e-7), name
        return
    if not numerics.half_rank:
        assert torch.allclose(loss, loss_f, rtol=1e-5)
        errors = {name: relative_error(grads_f[name], grads[name]) for name in grads}
        assert max(errors.values()) < 2e-2, sorted(errors.items(), key=lambda e: -e[1])[:3]
        return
    assert peft.exact is not None, "the bf16 rank-r path is measured against the fp32 model's step"
    assert torch.allclose(loss, loss_f, rtol=1e-4)
    ours, peft_own = _max_error(fused, peft.exact), _max_error(reference, peft.exact)
    assert ours <= 1.5 * peft_own + 5e-3, (ours, peft_own)


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


def record_masks(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[torch.Tensor | None]:
    """The keep masks `module`'s fused functions draw from now on, as bools, in the order drawn."""
    drawn: list[torch.Tensor | None] = []
    draw = module.keep_mask

    def record(like: torch.Tensor, p: float) -> Any:
        mask = draw(like, p)
        drawn.append(None if mask is None else mask.kept)
        return mask

    monkeypatch.setattr(module, "keep_mask", record)
    return drawn


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
