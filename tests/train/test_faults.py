"""Training faults (issue 8): kill -9 anywhere then resume equals an uninterrupted run; broken checkpoints are
never resumed from; a failing write stops the run cleanly; Ctrl-C twice quits at once; NaN steps stop or skip.

Kills are real SIGKILLs of a real training process. The deterministic kill points are reached by wrapping one
function in the (forked) child so that it kills itself there; everything else runs unchanged.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from chattune.config import build_config
from chattune.errors import ChattuneError
from chattune.rundir import checkpoint_problem, last_good_checkpoint
from chattune.train.run import run_training

MAX_STEPS = 10


def conversations(n: int, extra: dict[int, str] | None = None) -> str:
    rows = []
    for i in range(n):
        user = f"What is {i} plus one?" + (extra or {}).get(i, "")
        reply = f"The answer is {i + 1}." + " Yes." * (i % 3)  # varied lengths: grouping by length matters
        rows.append(
            {"conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
        )
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fault-data")
    (root / "train.jsonl").write_text(conversations(20))
    (root / "eval.jsonl").write_text(conversations(2))
    return root / "train.jsonl", root / "eval.jsonl"


def run_values(model_dir: Path, files: tuple[Path, Path], out: Path, precision: str = "fp32", **kw) -> dict:
    # 20 samples / batch 3 / accum 2 = 4 steps an epoch; checkpoints (and evals) at 3, 6, 9 are mid-epoch;
    # LoRA dropout on, so the resumed RNG state matters
    train, evals = files
    return dict(model=str(model_dir), train_file=str(train), eval_file=str(evals), eval_generate_samples=0,
                output_dir=str(out), batch_size=3, grad_accum=2, learning_rate=1e-2, max_steps=MAX_STEPS,
                logging_steps=1, save_steps=3, save_total_limit=2, lora_dropout=0.1, seed=1,
                num_threads=1, precision=precision) | kw  # fmt: skip


def quiet() -> Console:
    return Console(file=io.StringIO(), width=300, soft_wrap=True)


@pytest.fixture(scope="module")
def references(tiny_model_dir, files, tmp_path_factory) -> Callable[[str], Path]:
    """`references(precision)`: an uninterrupted run, the output every faulted-then-resumed run in that
    precision must reproduce (each made once, when first asked for)."""
    made: dict[str, Path] = {}

    def reference_in(precision: str) -> Path:
        if precision not in made:
            out = tmp_path_factory.mktemp(f"reference-{precision}") / "run"
            with pytest.MonkeyPatch.context() as mp:  # module fixtures run outside the per-test CHATTUNE_HOME
                mp.setenv("CHATTUNE_HOME", str(out.parent / "home"))
                values = run_values(tiny_model_dir, files, out, precision)
                run_training(build_config(values), console=quiet())
            made[precision] = out
        return made[precision]

    return reference_in


@pytest.fixture(scope="module")
def reference(references) -> Path:
    """The fp32 reference run, for the tests whose subject is not the arithmetic."""
    return references("fp32")


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    # A resumed run repeats the same operations on the same numbers (weights, optimizer moments, RNG state
    # and data order restored), so it lands on the same weights in any precision: measured bit-equal in
    # fp32 and in bf16 (bf16 base, fp32 adapters). The 1e-5 bound only leaves room for a kernel that picks
    # another summation order on another machine; a step done twice or lost moves adapters by ~1e-3.
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- kill -9
def _train_and_die(values: dict, point: str, step: int) -> None:
    """Forked child: wrap the function at `point` so that it SIGKILLs this process there, then train."""
    from transformers import Trainer

    import chattune.train.trainer as ct

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_when(owner, name, when) -> None:
        original = getattr(owner, name)

        def wrapper(*a, **k):
            if when(*a, **k):
                die()
            return original(*a, **k)

        setattr(owner, name, wrapper)

    micro = []
    if point == "step":  # after the first micro-batch's backward, before the optimizer step
        kill_when(ct.ChattuneTrainer, "training_step",
                  lambda self, *a, **k: self.state.global_step == step and micro.append(1) is None and len(micro) == 2)  # fmt: skip
    elif point == "checkpoint":  # adapter written to .staging/, optimizer.pt not yet
        kill_when(
            Trainer, "_save_optimizer_and_scheduler", lambda self, *a, **k: self.state.global_step == step
        )
    elif point == "rename":  # .staging/checkpoint-N complete, not yet renamed into place
        kill_when(ct, "replace_dir", lambda src, dst: dst.name == f"checkpoint-{step}")
    elif point == "rotate":  # checkpoint-N in place, older ones not yet deleted
        import transformers.trainer_utils as tu

        kill_when(tu, "rotate_checkpoints", lambda *a, **k: Path(k["output_dir"]).name != ".staging"
                  and (Path(k["output_dir"]) / f"checkpoint-{step}").is_dir())  # fmt: skip
    elif point == "eval":  # in the middle of the eval loop
        kill_when(Trainer, "prediction_step", lambda self, *a, **k: self.state.global_step == step)
    elif point == "best-swap":  # best/ moved aside, the new best/ not yet moved into place
        kill_when(os, "replace", lambda src, dst: Path(dst).name == "best" and Path(src).name == ".best.tmp"
                  and Path(dst).with_name(".best.old").exists())  # fmt: skip
    elif point == "final":  # final/ written to .final.tmp, not yet renamed
        kill_when(ct, "replace_dir", lambda src, dst: dst.name == "final")
    try:
        run_training(build_config(values), console=quiet())
    except BaseException:  # the kill point was never reached: the parent sees exit code 3
        os._exit(3)
    os._exit(0)


def kill_then_resume(model_dir, files, out: Path, point: str, step: int, precision: str = "fp32") -> Path:
    values = run_values(model_dir, files, out, precision)
    # fork: the child starts with torch and chattune already imported (seconds saved per kill point)
    child = multiprocessing.get_context("fork").Process(target=_train_and_die, args=(values, point, step))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL, (
        f"{point}@{step}: the kill point was not reached ({child.exitcode})"
    )
    assert not (out / "final").exists()
    console = quiet()
    final = run_training(build_config(values), console=console)
    said = console.file.getvalue()  # killed before its first checkpoint, a run starts again from scratch
    assert "Resuming from" in said or "starting afresh" in said
    return final


def assert_finished_like(reference: Path, out: Path) -> None:
    assert_same_weights(reference / "final", out / "final")
    assert_same_weights(reference / "best", out / "best")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(
        p.name for p in reference.glob("checkpoint-*")
    )
    assert not list(out.glob(".staging/*")) and not list(out.glob(".*.old")) and not list(out.glob(".*.tmp"))
    steps = [
        r["step"]
        for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert steps == list(range(1, MAX_STEPS + 1))  # records after the resumed checkpoint were not doubled


@pytest.mark.parametrize(("point", "step"), [("checkpoint", 6), ("step", 4)])
def test_kill_then_resume_equals_uninterrupted(
    tiny_model_dir, files, references, tmp_path, point, step, precision
):
    out = tmp_path / "run"
    kill_then_resume(tiny_model_dir, files, out, point, step, precision)
    assert_finished_like(references(precision), out)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "step"),
    [("step", 1), ("rename", 6), ("rotate", 9), ("eval", 6), ("eval", 3), ("best-swap", 0),
     ("final", 0), ("checkpoint", 3)],
)  # fmt: skip
def test_kill_anywhere_then_resume_equals_uninterrupted(
    tiny_model_dir, files, references, tmp_path, point, step, precision
):
    out = tmp_path / "run"
    kill_then_resume(tiny_model_dir, files, out, point, step, precision)
    assert_finished_like(references(precision), out)


@pytest.mark.slow
def test_kill_cli_run_at_a_random_moment_then_resume(tiny_model_dir, files, reference, tmp_path):
    """`kill -9` from outside at whatever moment the run has reached, then the same command again."""
    out = tmp_path / "run"
    values = run_values(tiny_model_dir, files, out)
    (tmp_path / "c.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    cmd = [sys.executable, "-m", "chattune", "train", "c.yaml"]
    env = os.environ | {"CHATTUNE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = out / "trainer_log.jsonl", time.time() + 240
    while not (log.is_file() and log.read_text().count('"loss"') >= 5):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_finished_like(reference, out)


# ---------------------------------------------------------------------------------------------- broken checkpoints
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "adapter_model.safetensors truncated": lambda c: truncate(c / "adapter_model.safetensors"),
    "adapter_model.safetensors missing": lambda c: (c / "adapter_model.safetensors").unlink(),
    "trainer_state.json missing": lambda c: (c / "trainer_state.json").unlink(),
    "trainer_state.json cut off": lambda c: truncate(c / "trainer_state.json"),
    "optimizer.pt missing": lambda c: (c / "optimizer.pt").unlink(),
    "optimizer.pt truncated": lambda c: truncate(c / "optimizer.pt"),
    "scheduler.pt missing": lambda c: (c / "scheduler.pt").unlink(),
    "rng_state.pth truncated": lambda c: truncate(c / "rng_state.pth"),
    "rng_state.pth missing": lambda c: (c / "rng_state.pth").unlink(),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_checkpoint_problem_names_each_corruption(reference, tmp_path, corruption):
    ckpt = shutil.copytree(reference / "checkpoint-9", tmp_path / "checkpoint-9")
    assert checkpoint_problem(ckpt) is None
    CORRUPTIONS[corruption](ckpt)
    problem = checkpoint_problem(ckpt)
    assert problem is not None and corruption.split()[0] in problem, problem


def test_corrupt_newest_checkpoint_falls_back_to_previous_with_warning(
    tiny_model_dir, files, reference, tmp_path
):
    out = shutil.copytree(reference, tmp_path / "run")
    shutil.rmtree(out / "final")  # the run was killed after checkpoint-10 and the disk mangled it
    truncate(out / "checkpoint-10" / "adapter_model.safetensors")
    console = quiet()
    final = run_training(build_config(run_values(tiny_model_dir, files, out)), console=console)
    said = console.file.getvalue()
    assert "Warning: checkpoint-10 cannot be resumed from (adapter_model.safetensors is truncated)" in said
    assert f"Resuming from {out / 'checkpoint-9'}" in said
    assert (out / ".corrupt" / "checkpoint-10").is_dir()  # kept for a look, out of the way
    assert checkpoint_problem(out / "checkpoint-10") is None  # written again, complete
    assert_same_weights(reference / "final", final)


def test_explicit_resume_from_a_broken_checkpoint_is_a_config_error(
    tiny_model_dir, files, reference, tmp_path
):
    from chattune.errors import ConfigError

    ckpt = shutil.copytree(reference / "checkpoint-9", tmp_path / "checkpoint-9")
    (ckpt / "optimizer.pt").unlink()
    values = run_values(tiny_model_dir, files, tmp_path / "run", resume=str(ckpt))
    with pytest.raises(ConfigError, match=r"optimizer\.pt is missing"):
        run_training(build_config(values), console=quiet())


class _RunsCode:
    """Unpickling this runs a shell command: what a tampered checkpoint file could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_resume_refuses_checkpoint_files_that_would_run_code(
    tiny_model_dir, files, reference, tmp_path, name
):
    ckpt = shutil.copytree(reference / "checkpoint-9", tmp_path / "checkpoint-9")
    marker = tmp_path / "code-ran"
    torch.save({"state": _RunsCode(marker)}, ckpt / name)  # a valid zip, so the structural check passes
    assert checkpoint_problem(ckpt) is None
    values = run_values(tiny_model_dir, files, tmp_path / "run", resume=str(ckpt))
    with pytest.raises(ChattuneError, match=rf"cannot resume from {re.escape(str(ckpt))}: loading its state"):
        run_training(build_config(values), console=quiet())
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- failed save
def test_failed_save_mid_run_stops_naming_the_step_and_keeps_previous_checkpoint(
    tiny_model_dir, files, reference, tmp_path
):
    out = shutil.copytree(reference, tmp_path / "run")
    for name in ("final", "checkpoint-10"):  # killed after checkpoint-9 (best/ is from step 9)
        shutil.rmtree(out / name)
    before = {p.name: p.read_bytes() for p in (out / "checkpoint-9").iterdir()}
    adapter = (out / "checkpoint-9" / "adapter_model.safetensors").stat().st_size
    optimizer = (out / "checkpoint-9" / "optimizer.pt").stat().st_size
    assert adapter < optimizer
    # a real failing write: the kernel refuses to grow any file past the limit (EFBIG), so checkpoint-9's
    # adapter fits but its optimizer.pt does not; Python ignores SIGXFSZ, so the write just fails
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((adapter + optimizer) // 2, hard))
    try:
        with pytest.raises(ChattuneError) as failure:
            run_training(build_config(run_values(tiny_model_dir, files, out)), console=quiet())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(failure.value)
    assert "saving the checkpoint at step 10 failed" in message, message
    assert f"the last good checkpoint is {out / 'checkpoint-9'}" in message, message
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-9").iterdir()} == before
    assert not (out / "checkpoint-10").exists() and not (out / ".staging" / "checkpoint-10").exists()
    assert last_good_checkpoint(out) == out / "checkpoint-9"
    # with the disk fixed, the same command finishes the run as if nothing happened
    final = run_training(build_config(run_values(tiny_model_dir, files, out)), console=quiet())
    assert_same_weights(reference / "final", final)


# ---------------------------------------------------------------------------------------------- Ctrl-C twice
SLOW_SAVE = """
import sys, time
from transformers import Trainer
def slow(self, output_dir):  # a checkpoint write on a very slow disk
    time.sleep(120)
Trainer._save_optimizer_and_scheduler = slow
from chattune.cli import main
sys.argv = ["chattune", "train", "c.yaml"]
main()
"""


def test_second_ctrl_c_quits_at_once_without_traceback(tiny_model_dir, files, tmp_path):
    out = tmp_path / "run"
    values = run_values(tiny_model_dir, files, out, max_steps=400, save_steps=1000, eval_file=None)
    (tmp_path / "c.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    env = os.environ | {"CHATTUNE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_SAVE)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    log, deadline = out / "trainer_log.jsonl", time.time() + 240
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # first: finish the step and save...
    while not (out / ".staging").is_dir():  # ...which is now under way, and slow
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # second: quit now
    start = time.time()
    _, stderr = proc.communicate(timeout=30)  # the slow save alone would take 120 s
    # most of what remains is the interpreter unloading torch & co. (about 1 s idle, 4 s on a busy 2-core box)
    assert time.time() - start < 15
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "Stopped at once; no checkpoint was written yet" in stderr, stderr[-2000:]
    # the half-written checkpoint is never resumed from: a rerun starts afresh and finishes (in-process: the
    # CLI path of a rerun is the random-kill test's)
    console = quiet()
    run_training(build_config(values | {"max_steps": 3}), console=console)
    said = console.file.getvalue()
    assert "starting afresh" in said and "Resuming" not in said


# ---------------------------------------------------------------------------------------------- NaN / inf
@pytest.fixture()
def poisoned(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """A base whose embedding of "Z" is NaN, and data where one sample of eight says "Z": exactly the step that
    trains on it has a NaN loss; every other step is fine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    z_ids = tok("Z", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[z_ids] = float("nan")
    base = tmp_path / "poisoned-model"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "z.jsonl"
    data.write_text(conversations(8, extra={3: " Z"}))
    assert not any(set(z_ids) & set(tok(f"What is {i} plus one?")["input_ids"]) for i in range(8))
    return base, data


def nan_values(poisoned, out, **kw) -> dict:
    base, data = poisoned
    return dict(model=str(base), train_file=str(data), output_dir=str(out), batch_size=2, grad_accum=1,
                learning_rate=1e-2, max_steps=4, logging_steps=4, save_steps=1, seed=1, num_threads=1) | kw  # fmt: skip


def test_nan_step_stops_naming_exact_step_and_a_clean_checkpoint(poisoned, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ChattuneError, match=r"the loss became nan at step (\d+)") as failure:
        run_training(build_config(nan_values(poisoned, out)), console=quiet())
    step = int(re.search(r"at step (\d+)", str(failure.value)).group(1))
    assert step > 1, "the sample with Z should not be in the first batch (data order changed?)"
    # logging every 4 steps and saving every step: nothing from step `step` on may be written
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == list(range(1, step))
    last = out / f"checkpoint-{step - 1}"
    assert f"the last good checkpoint is {last}" in str(failure.value)
    assert checkpoint_problem(last) is None
    assert all(torch.isfinite(t).all() for t in load_file(last / "adapter_model.safetensors").values())
    assert not (out / "final").exists()


def test_nan_step_is_skipped_when_configured(poisoned, tmp_path):
    console = quiet()
    final = run_training(
        build_config(nan_values(poisoned, tmp_path / "run", skip_nan_steps=1)), console=console
    )
    said = console.file.getvalue()
    assert "the loss is nan; this step was skipped (1 of skip_nan_steps: 1)" in said, said[-2000:]
    weights = load_file(final / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # the other steps trained
