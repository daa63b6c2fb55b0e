"""Two CPU processes (torchrun, gloo) follow the same loss curve as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def curve(out):
    rows = map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


def test_two_processes_match_one(tiny_model_dir, tmp_path):
    data = tmp_path / "conv.jsonl"
    with data.open("w") as f:
        for i in range(32):
            msgs = [{"role": "user", "content": f"What is {i} plus one?"},
                    {"role": "assistant", "content": f"The answer is {i + 1}." + " Yes." * (i % 5)}]  # fmt: skip
            f.write(json.dumps({"conversations": msgs}) + "\n")
    common = [f"model={tiny_model_dir}", f"train_file={data}", "max_steps=6", "logging_steps=1", "save_steps=100",
              "learning_rate=1e-2", "lora_dropout=0", "seed=3"]  # fmt: skip
    (tmp_path / "run.yaml").write_text("\n".join(c.replace("=", ": ", 1) for c in common) + "\n")
    env = os.environ | {"CHATTUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "chattune", "train", "run.yaml", f"output_dir={tmp_path / 'one'}",
           "batch_size=4", "grad_accum=2"]  # fmt: skip
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "chattune", "train", "run.yaml", f"output_dir={tmp_path / 'two'}", "batch_size=2", "grad_accum=2"]  # fmt: skip
    for cmd in (one, two):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, abs=1e-4)
