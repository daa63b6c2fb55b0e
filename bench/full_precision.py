"""Full and freeze fine-tuning in bf16: fp32 master weights under bf16 autocast vs pure bf16 weights.

The question behind chattune's default (`pure_bf16: false`): with bf16 compute, should the weights that learn
(and their gradients and AdamW moments) be kept in fp32 or in bf16? One invocation trains the same small real
job — SmolLM2-135M-Instruct, the first AdvertiseGen rows as prompt -> completion, template `raw` — four ways
(full and freeze x master and pure), each run in its own child process, and prints per run the loss curve's
mean and end, the share of weights the run moved, the step time and the peak RSS.

`--compute bf16` (the default) runs what users get: `precision: bf16` with `pure_bf16` false or true. It needs
a CPU with AVX-512-BF16/AMX (or a GPU) to finish in minutes; on an AVX2-only CPU bf16 matmuls are 50-400x
slower than fp32. There, `--compute fp32` isolates the one thing the two modes do differently: both compute in
fp32, and the `pure` runs round every weight and both AdamW moments to bf16 after each optimizer step (and the
weights once after loading), as bf16 storage does. That shows the effect on learning exactly; its memory and
speed are not those of bf16, so measure those with `--compute bf16` and a short job (e.g. `--max-steps 2
--max-length 32 --batch 1`), where the matmul speed matters little.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from train_throughput import DEFAULT_DATA, MIB, prepare_data

RUNS = ("full-master", "full-pure", "freeze-master", "freeze-pure")
FREEZE_TRAINABLE = 2  # freeze: the last two blocks learn


def round_to_bf16(tensors: list[torch.Tensor]) -> None:
    """Round fp32 tensors in place to the nearest bf16 value (what storing them in bf16 does)."""
    for t in tensors:
        t.copy_(t.to(torch.bfloat16))


def emulate_bf16_storage() -> None:
    """fp32 compute with bf16 storage of the learning state: weights rounded after loading and, with both
    AdamW moments, after every optimizer step."""
    import chattune.models.load as load

    original = load.load_model

    def load_rounded(*args: Any, **kwargs: Any) -> Any:
        model = original(*args, **kwargs)
        with torch.no_grad():
            round_to_bf16([p.data for p in model.parameters()])
        return model

    load.load_model = load_rounded  # run_training imports it from the module at call time

    def after_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        with torch.no_grad():
            params = [p for group in optimizer.param_groups for p in group["params"]]
            moments = [
                s[k] for p in params for k in ("exp_avg", "exp_avg_sq") if (s := optimizer.state.get(p))
            ]
            round_to_bf16([p.data for p in params] + moments)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(after_step)


def child(a: argparse.Namespace) -> None:
    """One run in this process; writes its measurements to --result."""
    from safetensors.torch import load_file

    from chattune.config import build_config
    from chattune.train.run import run_training

    method, mode = a.child.split("-")
    pure = mode == "pure"
    if pure and a.compute == "fp32":
        emulate_bf16_storage()
    out = a.workdir / a.child
    half = a.max_length // 2
    job = {"model": a.model, "train_file": str(a.workdir / "data.jsonl"), "format": "prompt_response"}
    job |= {"template": "raw", "max_source_len": half, "max_target_len": a.max_length - half - 1}
    job |= {
        "precision": a.compute,
        "pure_bf16": pure,
        "method": method,
        "freeze_trainable_layers": FREEZE_TRAINABLE,
    }
    job |= {"batch_size": a.batch, "grad_accum": 1, "learning_rate": a.lr, "lr_scheduler": "constant"}
    job |= {"epochs": 1, "max_steps": a.max_steps, "seed": 0, "report_to": "none", "save_steps": 10**9}
    job |= {"logging_steps": 1, "output_dir": str(out), "overwrite_output_dir": True}
    final = run_training(build_config(job))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    trained = load_file(final / "model.safetensors")
    base = load_file(Path(a.model) / "model.safetensors")
    layers = json.loads((Path(a.model) / "config.json").read_text())["num_hidden_layers"]
    learning = [f".layers.{i}." for i in range(layers - FREEZE_TRAINABLE, layers)]
    moved = total = 0
    for name, weight in trained.items():
        if weight.ndim == 2 and (method == "full" or any(block in name for block in learning)):
            start = base[name].to(torch.bfloat16 if pure else torch.float32).float()
            moved, total = moved + int((weight.float() != start).sum()), total + weight.numel()
    res = {"losses": losses, "wall_s": log[-1]["train_runtime"], "steps": log[-1]["step"]}
    res |= {
        "moved": moved / max(total, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    res |= {"final_mib": sum(f.stat().st_size for f in final.glob("*.safetensors")) / MIB}
    shutil.rmtree(out, ignore_errors=True)
    Path(a.result).write_text(json.dumps(res))


def spawn(a: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run `name` in a fresh interpreter; its output goes to a log file in the work dir."""
    result, log = a.workdir / f"{name}.json", a.workdir / f"{name}.log"
    cmd = [sys.executable, __file__, "--child", name, "--result", str(result), "--workdir", str(a.workdir)]
    cmd += ["--model", a.model, "--compute", a.compute, "--max-length", str(a.max_length)]
    cmd += ["--max-steps", str(a.max_steps), "--batch", str(a.batch), "--lr", str(a.lr)]
    env = os.environ | {"CHATTUNE_HOME": str(a.workdir / "home"), "HF_HUB_OFFLINE": "1"}
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        sys.exit(f"run {name} failed (exit {code}); the end of {log}:\n{log.read_text()[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="chattune alias or model dir")
    p.add_argument("--compute", choices=("bf16", "fp32"), default="bf16", help="see the module docstring")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5, help="constant; 1e-5 is the usual full fine-tuning rate")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="AdvertiseGen JSON lines")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    from transformers import AutoTokenizer

    from chattune.models.load import cpu_has_fast_bf16, resolve_path

    a.model = resolve_path(a.model)
    a.workdir = Path(tempfile.mkdtemp(prefix="chattune-precision-"))
    rows = a.batch * a.max_steps
    prepare_data(a.data, rows, AutoTokenizer.from_pretrained(a.model), a.max_length, a.workdir / "data.jsonl")
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, fast bf16: {cpu_has_fast_bf16()}"
    )
    print(f"{device}; compute {a.compute}; {rows} rows, batch {a.batch}, lr {a.lr}, {a.max_steps} steps")
    results = {}
    for name in [r.strip() for r in a.runs.split(",") if r.strip()]:
        r = results[name] = spawn(a, name)
        curve = r["losses"]
        tail = curve[-max(len(curve) // 4, 1) :]
        print(
            f"{name:14} loss first {curve[0]:.4f} mean {sum(curve) / len(curve):.4f} last quarter "
            f"{sum(tail) / len(tail):.4f}   weights moved {100 * r['moved']:.1f}%   "
            f"{r['wall_s'] / r['steps']:.2f} s/step   peak RSS {r['peak_rss_mib']:,.0f} MiB   "
            f"final/ {r['final_mib']:,.0f} MiB",
            flush=True,
        )
    if a.json:
        a.json.write_text(
            json.dumps({"settings": {k: str(v) for k, v in vars(a).items()}, "runs": results}, indent=2)
        )
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
