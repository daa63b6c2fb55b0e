"""Run guards: a diverging loss stops with the step named, Ctrl-C saves a checkpoint, unwritable dirs fail early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chattune.config import build_config
from chattune.errors import ChattuneError, ConfigError
from chattune.system import find_allocator
from chattune.train.run import run_training


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(16)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_nan_loss_stops_with_step(tiny_model_dir, data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "broken-model"  # a base with a corrupted (NaN) weight: every loss is NaN
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    cfg = build_config(dict(model=str(broken), train_file=str(data), output_dir=str(tmp_path / "o"),
                            max_steps=30, logging_steps=1, batch_size=4, grad_accum=1, num_threads=1))  # fmt: skip
    with pytest.raises(ChattuneError, match=r"the loss became nan at step 1; no checkpoint"):
        run_training(cfg)
    assert not (tmp_path / "o" / "final").exists()


def test_unwritable_output_dir_fails_before_training(tiny_model_dir, data, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/chattune-cannot-write-here"  # root can write anywhere else
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "run")
    with pytest.raises(ConfigError, match="output_dir"):
        run_training(build_config(dict(model=str(tiny_model_dir), train_file=str(data), output_dir=target)))


def test_ctrl_c_saves_a_checkpoint_then_resume_finishes(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(
        f"model: {tiny_model_dir}\ntrain_file: {data}\noutput_dir: {out}\nmax_steps: 400\nlogging_steps: 1\n"
        "save_steps: 1000\nbatch_size: 2\ngrad_accum: 1\nnum_threads: 1\n"
    )
    env = os.environ | {"CHATTUNE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "chattune", "train", "c.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = out / "trainer_log.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in stderr and "training interrupted" in stderr and "checkpoint-" in stderr
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())
    done = subprocess.run([sys.executable, "-m", "chattune", "train", "c.yaml", "max_steps=20"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resuming from" in done.stderr and (out / "final").is_dir()
    # the program re-ran itself under the faster malloc when the machine has one (chattune/system.py)
    lib = find_allocator("auto")
    expected = "system" if lib is None else "tcmalloc" if "tcmalloc" in lib.name else "jemalloc"
    assert f"allocator: {expected}" in done.stderr


# Lowers the process's data limit (RLIMIT_DATA: heap and anonymous mappings) to what it uses plus a little,
# just before the first training step, so that step's activations really fail to allocate.
_TIGHT_MEMORY = """
import resource
import chattune.train.trainer as trainer

step = trainer.ChattuneTrainer.training_step

def tight(self, *args, **kwargs):
    if not getattr(self, "tightened", False):
        self.tightened = True
        with open("/proc/self/status") as status:
            used = next(int(line.split()[1]) for line in status if line.startswith("VmData:")) * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (used + (24 << 20), resource.RLIM_INFINITY))
    return step(self, *args, **kwargs)

trainer.ChattuneTrainer.training_step = tight
"""


@pytest.mark.parametrize("allocator", ["system", "auto"])
def test_out_of_memory_is_one_message_naming_step_batch_and_levers(tiny_model_dir, tmp_path, allocator):
    if allocator == "auto" and find_allocator("auto") is None:
        pytest.skip("neither tcmalloc nor jemalloc is installed")
    rows = [{"prompt": "count " * 200, "response": "one two three " * 40} for _ in range(32)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_TIGHT_MEMORY)
    env = os.environ | {"CHATTUNE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(inject)}
    settings = {"model": str(tiny_model_dir), "train_file": "d.jsonl", "output_dir": "out", "batch_size": 32,
                "grad_accum": 2, "max_steps": 2, "allocator": allocator, "precision": "fp32"}  # fmt: skip
    (tmp_path / "run.yaml").write_text(json.dumps(settings))
    cmd = [sys.executable, "-m", "chattune", "train", "run.yaml"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 5, said[-3000:]
    assert "Traceback" not in said
    assert "out of memory on cpu at step 1, in a micro-batch of 32 samples x" in said, said[-3000:]
    assert "batch_size=16 grad_accum=4" in said and "max_seq_len" in said and "gradient_checkpointing" in said
