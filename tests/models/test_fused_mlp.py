"""The fused LoRA SwiGLU MLP: the same loss and gradients as peft's modules, with less saved for backward."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from rich.console import Console
from tests.models.conftest import LoraNumerics, assert_same_step, record_fallbacks, record_masks

from chattune.config import build_config
from chattune.models import fused_mlp
from chattune.models.checkpointing import checkpoint_mlps
from chattune.models.fused_mlp import FusedLoraMlpForward, fuse_lora_mlps
from chattune.train.run import run_training

IDS = torch.randint(0, 50, (4, 48), generator=torch.Generator().manual_seed(0))


def _mlps(model) -> list:
    return [m for n, m in model.named_modules() if n.endswith(".mlp")]


def test_same_loss_and_gradients_with_less_saved(
    tiny_model_dir: Path, make_lora_model, lora_step, peft_steps, numerics: LoraNumerics
) -> None:
    peft = peft_steps(tiny_model_dir, numerics, IDS, lora_dropout=0.0)
    reference = peft.reference
    model = make_lora_model(tiny_model_dir, numerics.precision, lora_dropout=0.0)
    assert fuse_lora_mlps(model) == 2
    fallbacks = record_fallbacks(model, (FusedLoraMlpForward,))
    fused = lora_step(model, IDS)
    assert fallbacks == []
    assert any("mlp" in n for n in fused[1])
    assert_same_step(peft, fused, numerics)
    # per token the tiny MLP saved 4 x 128 wide tensors; fused it saves 2 of them (2 bytes each in bf16)
    width = torch.finfo(numerics.dtype).bits // 8
    assert fused[2] < reference[2] - 2 * IDS.numel() * 128 * width * 2 * 0.95, (fused[2], reference[2])


def test_composes_with_mlp_checkpointing(
    tiny_model_dir: Path, make_lora_model, lora_step, peft_steps, numerics: LoraNumerics
) -> None:
    peft = peft_steps(tiny_model_dir, numerics, IDS, lora_dropout=0.0)
    model = make_lora_model(tiny_model_dir, numerics.precision, lora_dropout=0.0)
    fuse_lora_mlps(model)
    checkpoint_mlps(model)
    assert_same_step(peft, lora_step(model, IDS), numerics)


def test_runs_the_original_forward_where_it_does_not_apply(tiny_model_dir: Path, make_lora_model) -> None:
    model = make_lora_model(tiny_model_dir, lora_dropout=0.0)
    assert fuse_lora_mlps(model) == 2 and fuse_lora_mlps(model) == 2  # a second call changes nothing
    mlp = _mlps(model)[0]
    assert isinstance(mlp.forward, FusedLoraMlpForward)
    x = torch.randn(2, 5, 64, requires_grad=True)
    fused = mlp(x)
    with model.disable_adapter():  # adapters off: the base block, which the fused path must not compute
        plain = mlp(x)
        assert torch.allclose(plain, mlp.forward.original(x))
    assert not torch.allclose(fused, plain)
    with torch.no_grad():  # eval and generation take the stock path
        assert torch.allclose(mlp(x), fused, atol=1e-6)


def test_lora_dropout_gives_peft_gradients_for_the_same_masks(
    tiny_model_dir: Path,
    make_lora_model,
    lora_step,
    peft_steps,
    replay_masks,
    monkeypatch,
    numerics: LoraNumerics,
) -> None:
    # adapters on the MLP only, so that every dropout mask in the model is one the fused function draws
    settings = {"lora_dropout": 0.3, "lora_target": list(fused_mlp.PROJECTIONS)}
    model = make_lora_model(tiny_model_dir, numerics.precision, **settings)
    assert fuse_lora_mlps(model) == 2
    drawn = record_masks(monkeypatch, fused_mlp)
    fused = lora_step(model, IDS)
    assert len(drawn) == 6 and 0.6 < float(torch.cat([m.flatten() for m in drawn]).float().mean()) < 0.8
    # gate and up read the same x: their masks agree where two independent draws would, p^2 + (1-p)^2 of the
    # elements (0.58), within 5 binomial standard deviations (0.016 over the 2 x 12,288 elements)
    p = 77 / 256
    agree = float(torch.cat([(drawn[i] == drawn[i + 1]).flatten() for i in (0, 3)]).float().mean())
    expected = p**2 + (1 - p) ** 2
    assert abs(agree - expected) < 5 * (expected * (1 - expected) / (2 * drawn[0].numel())) ** 0.5, agree

    # drawn in gate, up, down order per layer, at 0.3 quantised to 77/256
    replay = lambda reference: replay_masks(reference, drawn, fused_mlp.PROJECTIONS, 77 / 256)  # noqa: E731
    assert_same_step(peft_steps(tiny_model_dir, numerics, IDS, replay, **settings), fused, numerics)
    model.eval()  # no dropout in eval: the fused path must not draw masks there either
    drawn.clear()
    with torch.no_grad():
        model(input_ids=IDS)
    assert drawn == []


def test_left_alone_where_the_structure_differs(tiny_model_dir: Path, make_lora_model) -> None:
    attention_only = make_lora_model(tiny_model_dir, lora_dropout=0.0, lora_target=["q_proj", "v_proj"])
    assert fuse_lora_mlps(attention_only) == 0
    gelu = make_lora_model(tiny_model_dir, lora_dropout=0.0)
    for name, module in gelu.named_modules():
        if name.endswith(".mlp"):
            module.act_fn = torch.nn.GELU()
    assert fuse_lora_mlps(gelu) == 0


def test_a_lora_run_uses_it_unless_switched_off(tiny_model_dir: Path, tmp_path: Path) -> None:

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Capital of France?", "response": "Paris"}) + "\n")
    headers = {}
    for fuse in (True, False):
        values = {"model": str(tiny_model_dir), "train_file": str(data), "format": "prompt_response"}
        values |= {"output_dir": str(tmp_path / f"out-{fuse}"), "fuse_lora": fuse, "max_steps": 6}
        values |= {
            "batch_size": 1,
            "grad_accum": 1,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "precision": "fp32",
        }
        log = io.StringIO()
        run_training(build_config(values | {"num_threads": 1}), console=Console(file=log, width=200))
        headers[fuse] = log.getvalue()
        losses = [
            json.loads(x)["loss"]
            for x in (tmp_path / f"out-{fuse}" / "trainer_log.jsonl").open()
            if '"loss"' in x
        ]
        assert losses[-1] < losses[0]
    assert (
        "fused LoRA: 2 MLP blocks, 14 projections, 5 RMSNorms" in headers[True]
        and "fused LoRA" not in headers[False]
    )
