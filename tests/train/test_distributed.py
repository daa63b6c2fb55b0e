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


# Two ranks see the same samples as one process but in batches of 2 instead of 4, and their gradients are
# summed across processes: the same arithmetic in other orders and shapes, carried on by six updates at
# lr 1e-2. fp32: measured 1.3e-5 apart, held to 1e-4. bf16 (bf16 weights, fp32 adapters): the forward
# rounds to 8 significant bits in other places; measured 2.6e-3 apart on a loss of ~5.6 (4.7e-4 relative,
# the same here and on an AMX CPU), held to 4e-3 relative, one bf16 step (2^-8).
TOLERANCE = {"fp32": {"abs": 1e-4}, "bf16": {"rel": 4e-3}}


def test_two_processes_match_one(tiny_model_dir, tmp_path, precision):
    data = tmp_path / "conv.jsonl"
    with data.open("w") as f:
        for i in range(32):
            msgs = [{"role": "user", "content": f"What is {i} plus one?"},
                    {"role": "assistant", "content": f"The answer is {i + 1}." + " Yes." * (i % 5)}]  # fmt: skip
            f.write(json.dumps({"conversations": msgs}) + "\n")
    common = [f"model={tiny_model_dir}", f"train_file={data}", "max_steps=6", "logging_steps=1", "save_steps=100",
              "learning_rate=1e-2", "lora_dropout=0", "seed=3", f"precision={precision}"]  # fmt: skip
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
    assert a == pytest.approx(b, **TOLERANCE[precision])


def test_a_failed_save_on_rank_0_ends_every_process(tiny_model_dir, tmp_path):
    # rank 0 fails to move checkpoint-2 into place (the disk is full); rank 1 is then waiting at the save's
    # barrier: the run must end with the save's message, not hang until the process group's timeout
    import time

    data = tmp_path / "conv.jsonl"
    rows = [{"prompt": f"What is {i} plus one?", "response": f"{i + 1}"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "_replace = os.replace\n"
        "def replace(src, dst, *a, **k):\n"
        "    if os.environ.get('RANK') == '0' and os.path.basename(os.fspath(dst)) == 'checkpoint-2':\n"
        "        raise OSError(28, 'No space left on device', os.fspath(dst))\n"
        "    return _replace(src, dst, *a, **k)\n"
        "os.replace = replace\n"
    )
    env = os.environ | {"CHATTUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    settings = {"model": str(tiny_model_dir), "train_file": str(data), "format": "prompt_response"}
    settings |= {"max_steps": 4, "save_steps": 2, "batch_size": 2, "output_dir": str(tmp_path / "out")}
    (tmp_path / "run.yaml").write_text(json.dumps(settings))  # JSON is YAML
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "chattune", "train"]
    cmd.append("run.yaml")
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    took = time.monotonic() - started
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "saving the checkpoint at step 2 failed: No space left on device" in said, said[-3000:]
    assert took < 240  # the gloo group's timeout is 30 minutes: a waiting rank 1 would show here
    assert not (tmp_path / "out" / "checkpoint-2").exists()
