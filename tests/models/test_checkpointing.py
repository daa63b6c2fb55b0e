"""`gradient_checkpointing: mlp`: the MLPs recompute in backward, with the same gradients and less saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chattune.config import build_config
from chattune.errors import ConfigError
from chattune.models.checkpointing import checkpoint_mlps
from chattune.train.run import run_training


def test_same_gradients_with_less_saved(tiny_model_dir: Path, make_lora_model, lora_step) -> None:
    ids = torch.randint(0, 50, (4, 48), generator=torch.Generator().manual_seed(0))
    loss, grads, kept = lora_step(make_lora_model(tiny_model_dir), ids)
    model = make_lora_model(tiny_model_dir)
    assert checkpoint_mlps(model) == 2  # one MLP per layer of the 2-layer model
    loss_ckpt, grads_ckpt, kept_ckpt = lora_step(model, ids)
    assert torch.allclose(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-6), name
    # the tiny MLP is 128 wide against a 64-wide hidden state: most saved bytes go with it
    assert kept_ckpt < 0.75 * kept, (kept_ckpt, kept)


def test_wrapping_twice_is_a_no_op_and_eval_is_untouched(tiny_model_dir: Path, make_lora_model) -> None:
    model = make_lora_model(tiny_model_dir)
    checkpoint_mlps(model)
    forwards = [m.forward for n, m in model.named_modules() if n.endswith(".mlp")]
    assert checkpoint_mlps(model) == 2
    assert forwards == [m.forward for n, m in model.named_modules() if n.endswith(".mlp")]
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_model_without_mlp_blocks_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="gradient_checkpointing: true"):
        checkpoint_mlps(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_training_with_mlp_checkpointing_learns(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Capital of France?", "response": "Paris"}) + "\n")
    values = {"model": str(tiny_model_dir), "train_file": str(data), "format": "prompt_response"}
    values |= {"output_dir": str(tmp_path / "out"), "gradient_checkpointing": "mlp", "max_steps": 8}
    values |= {"batch_size": 1, "grad_accum": 1, "learning_rate": 1e-2, "logging_steps": 1, "num_threads": 1}
    out = run_training(build_config(values))
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "out" / "trainer_log.jsonl").open()
        if '"loss"' in line
    ]
    assert (out / "adapter_model.safetensors").is_file()
    assert losses[-1] < losses[0]
