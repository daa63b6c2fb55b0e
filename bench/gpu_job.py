"""The user's job on one GPU: a ChatGLM3-6B-class model, LoRA and P-Tuning v2, against TRL's best configuration.

The model is `GlmForCausalLM` (what `chattune model convert-chatglm3` produces) in ChatGLM3-6B's shape (or a tiny
one of the same architecture with `--shape tiny`, for a CPU check of every path) with random weights built on the
device from its config: a device without network access cannot download 12 GB. The tokenizer is the real ChatGLM3
SentencePiece model and the text is real: AdvertiseGen rows in the `chatglm3` template, as single exchanges
(`short`, ~100-200 tokens: what packing is for) and as multi-turn conversations of consecutive rows filling up to
`--seq` tokens (`long`: the Pokemon tutorial's P-Tuning v2 setting, batch 1 x 16 accumulation at seq 2,048).

Runs (each in its own process, bf16):
- `lora-packed`, `lora-padded`: chattune LoRA r=8 all-linear, 16 `short` samples per micro-batch, packed into one
  row (a varlen attention kernel) or padded (grouped by length);
- `ptv2`: chattune P-Tuning v2, pre_seq_len 128, `long` samples, batch 1 x 16;
- `trl-best`: TRL's SFTTrainer on the same token ids and labels (chattune's encoding, pre-tokenized), LoRA as
  above, `packing=True` (best-fit rows of `--seq` tokens, padding-free), `use_liger_kernel=True` when liger is
  installed, no gradient checkpointing;
- `lora-packed-24g`, `ptv2-24g`: the chattune runs again under `torch.cuda.set_per_process_memory_fraction` of
  24 GiB, trying no checkpointing, then `gradient_checkpointing: mlp`, then `true`, each in a fresh process,
  until one fits (a run that does not fit ends with chattune's out-of-memory message, exit 5).

Per run: tokens/s and supervised tokens/s over the steady-state micro-batches (the first optimizer step is
warm-up and excluded; raw per-micro-batch times are in the JSON), peak `max_memory_allocated` and reserved, the
first logged loss. On CPU the memory cap does not apply and the `-24g` runs are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from train_throughput import DEFAULT_DATA

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "models/chatglm3-tokenizer/tokenizer.model"
MIB, GIB = 2**20, 2**30
CAP_GIB = 24
OUT_OF_MEMORY_EXIT = 5  # chattune's exit status for an out-of-memory step (errors.OutOfMemory)
# ChatGLM3-6B's config.json (the fields the GLM conversion reads); `tiny` keeps the architecture, shrinks the sizes
SHAPES = {
    "chatglm3-6b": {
        "hidden_size": 4096,
        "ffn_hidden_size": 13696,
        "num_layers": 28,
        "num_attention_heads": 32,
    },
    "tiny": {"hidden_size": 64, "ffn_hidden_size": 160, "num_layers": 2, "num_attention_heads": 4},
}
COMMON_SHAPE = {
    "kv_channels": None,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "padded_vocab_size": 65024,
    "seq_length": 8192,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "add_qkv_bias": True,
    "add_bias_linear": False,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "rope_ratio": 1,
}
LORA = {"method": "lora", "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.1, "lora_target": "all-linear"}
RUNS: dict[str, dict[str, Any]] = {
    "lora-packed": LORA | {"packing": True, "data": "short", "batch_size": 16, "grad_accum": 1},
    "lora-padded": LORA | {"data": "short", "batch_size": 16, "grad_accum": 1},
    "ptv2": {"method": "ptuning_v2", "pre_seq_len": 128, "data": "long", "batch_size": 1, "grad_accum": 16},
    "trl-best": {"data": "short"},
}
CAPPED = {"lora-packed-24g": "lora-packed", "ptv2-24g": "ptv2"}
CHECKPOINTING = (False, "mlp", True)  # tried in this order under the cap: fastest first


def glm_config(shape: str) -> Any:
    """The GlmConfig of a ChatGLM3 checkpoint of this shape."""
    from chattune.models.chatglm3_convert import glm_config_from_chatglm3

    cfg = COMMON_SHAPE | SHAPES[shape]
    cfg["kv_channels"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return glm_config_from_chatglm3(cfg | {"torch_dtype": "bfloat16"})


def prepare(a: argparse.Namespace) -> None:
    """The model dir (config + tokenizer, no weights) and the two data files in the work dir."""
    from chattune.models.chatglm3_tokenizer import load_chatglm3_tokenizer

    model = a.workdir / "model"
    model.mkdir(parents=True, exist_ok=True)
    shutil.copy(a.tokenizer, model / "tokenizer.model")
    glm_config(a.shape).save_pretrained(model)
    tok = load_chatglm3_tokenizer(str(model))
    rows = [json.loads(line) for line in a.data.read_text(encoding="utf-8").splitlines()]
    exchanges = [
        [{"role": "user", "content": r["content"]}, {"role": "assistant", "content": r["summary"]}]
        for r in rows
    ]
    with (a.workdir / "short.jsonl").open("w", encoding="utf-8") as f:
        for turns in exchanges[: a.short_rows]:
            f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    budget = a.seq - 16  # the template's role tokens per turn: measured 5, so 16 leaves room
    with (a.workdir / "long.jsonl").open("w", encoding="utf-8") as f:
        conversation: list[dict[str, str]] = []
        size, written = 0, 0
        for turns in exchanges:
            n = sum(len(tok.encode(m["content"], add_special_tokens=False)) + 5 for m in turns)
            if size + n > budget and conversation:
                f.write(json.dumps({"conversations": conversation}, ensure_ascii=False) + "\n")
                conversation, size, written = [], 0, written + 1
                if written == a.long_rows:
                    break
            conversation, size = conversation + turns, size + n


def job(a: argparse.Namespace, run: str, checkpointing: bool | str) -> dict[str, Any]:
    """The chattune config of a run."""
    spec = {k: v for k, v in RUNS[run].items() if k != "data"}
    values = {"model": str(a.workdir / "model"), "train_file": str(a.workdir / f"{RUNS[run]['data']}.jsonl")}
    values |= {
        "template": "chatglm3",
        "precision": a.precision,
        "max_seq_len": a.seq,
        "max_source_len": a.seq // 2,
    }
    values |= {"max_target_len": a.seq // 2, "learning_rate": 2e-4, "max_steps": a.steps, "seed": 0}
    values |= {"gradient_checkpointing": checkpointing, "report_to": "none", "save_steps": 10**9}
    values |= {"logging_steps": 1, "output_dir": str(a.workdir / "runs" / run), "overwrite_output_dir": True}
    return values | spec


def random_weights_on_device(device: str) -> None:
    """Make chattune's loader build the model from its config on `device` with random weights."""
    import chattune.models.load as load

    def from_config(model: str, *, precision: str = "bf16", **_: Any) -> Any:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device(device):
            net = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(model), dtype=load.compute_dtype(precision)
            )
        net.config.use_cache = False
        return net

    load.load_model = from_config  # run_training imports it from the module when it starts


class Clock:
    """Times each micro-batch (entry to entry, so optimizer steps count) and counts its tokens."""

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self.supervised: list[int] = []

    def wrap(self, trainer_cls: type) -> None:
        """Wrap `trainer_cls.training_step`."""
        original, clock = trainer_cls.training_step, self

        def training_step(trainer: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            clock.sync()
            clock.stamps.append(time.perf_counter())
            mask = inputs.get("attention_mask")
            clock.tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            clock.supervised.append(int((inputs["labels"] != -100).sum()))
            return original(trainer, model, inputs, *args, **kwargs)

        trainer_cls.training_step = training_step

    def finish(self) -> None:
        """Stamp the end of the last micro-batch."""
        self.sync()
        self.stamps.append(time.perf_counter())

    def summary(self, warmup: int) -> dict[str, Any]:
        """Steady-state rates over the micro-batches after `warmup`, and the raw times."""
        times = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        steady = slice(min(warmup, len(times) - 1), None)
        wall = sum(times[steady])
        return {
            "micro_batch_s": times,
            "warmup_micro_batches": steady.start,
            "tokens_per_s": sum(self.tokens[steady]) / wall,
            "supervised_tokens_per_s": sum(self.supervised[steady]) / wall,
            "tokens_per_micro_batch": self.tokens,
        }


def run_chattune(a: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """A chattune run through `run_training`; first loss from its log."""
    from chattune.config import build_config
    from chattune.train.run import run_training
    from chattune.train.trainer import ChattuneTrainer

    clock.wrap(ChattuneTrainer)
    cfg = build_config(job(a, a.base_run, a.checkpointing))
    run_training(cfg)
    out = Path(cfg.output_dir)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    return {"first_loss": next(r["loss"] for r in log if "loss" in r), "grad_accum": cfg.grad_accum}


def run_trl(a: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """TRL's SFTTrainer on chattune's token ids and labels, packed padding-free, liger, no checkpointing."""
    import datasets
    from peft import LoraConfig
    from rich.console import Console
    from trl import SFTConfig, SFTTrainer

    from chattune.config import build_config
    from chattune.data.prepare import encode_split, template_for
    from chattune.models.load import load_model, load_tokenizer

    cfg = build_config(job(a, "lora-packed", False))
    tok = load_tokenizer(cfg.model)
    encoded, _ = encode_split(cfg, tok, template_for(cfg, tok), cfg.train_file, Console(stderr=True))
    dataset = datasets.Dataset.from_dict({"input_ids": encoded["input_ids"], "labels": encoded["labels"]})
    liger = importlib.util.find_spec("liger_kernel") is not None
    args = SFTConfig(
        output_dir=str(a.workdir / "runs" / "trl"),
        per_device_train_batch_size=1,  # one packed row of `--seq` tokens ≈ chattune's 16 packed samples
        learning_rate=2e-4,
        max_steps=a.steps,
        max_length=a.seq,
        packing=True,
        padding_free=True,
        use_liger_kernel=liger,
        gradient_checkpointing=False,
        bf16=a.precision == "bf16",
        use_cpu=a.device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    model = load_model(cfg.model, precision=a.precision)
    lora = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(model, args, train_dataset=dataset, processing_class=tok, peft_config=lora)
    clock.wrap(type(trainer))
    trainer.train()
    first = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return {"first_loss": first, "grad_accum": 1, "liger": liger}


def child(a: argparse.Namespace) -> None:
    """One run (or one attempt of a capped run) in this process; writes its measurements to --result."""
    if a.device == "cuda" and a.cap:
        torch.cuda.set_per_process_memory_fraction(
            CAP_GIB * GIB / torch.cuda.get_device_properties(0).total_memory
        )
    random_weights_on_device(a.device)
    clock = Clock(a.device)
    res = (run_trl if a.base_run == "trl-best" else run_chattune)(a, clock)
    clock.finish()
    res |= clock.summary(warmup=res["grad_accum"])
    if a.device == "cuda":
        res |= {"peak_gpu_mib": torch.cuda.max_memory_allocated() / MIB}
        res |= {"peak_reserved_mib": torch.cuda.max_memory_reserved() / MIB}
    Path(a.result).write_text(json.dumps(res))


def spawn(
    a: argparse.Namespace, run: str, base_run: str, checkpointing: bool | str, cap: bool
) -> dict[str, Any]:
    """One attempt in a fresh interpreter; returns its result, or {"exit": code} when it failed."""
    tag = f"{run}-gc{checkpointing}".lower()
    result, log = a.workdir / f"{tag}.json", a.workdir / f"{tag}.log"
    cmd = [sys.executable, __file__, "--child", "--base-run", base_run, "--result", str(result)]
    cmd += ["--workdir", str(a.workdir), "--device", a.device, "--shape", a.shape, "--seq", str(a.seq)]
    cmd += ["--precision", a.precision, "--steps", str(a.steps), "--checkpointing", str(checkpointing)] + (
        ["--cap"] if cap else []
    )
    env = os.environ | {
        "CHATTUNE_HOME": str(a.workdir / "home"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    started = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    took = time.perf_counter() - started
    if code != 0:
        print(f"  {run} (gradient_checkpointing {checkpointing}): exit {code} after {took:.0f} s", flush=True)
        tail = log.read_text()[-2000:]
        if code != OUT_OF_MEMORY_EXIT:
            print(tail, flush=True)
        return {"exit": code, "log_tail": tail}
    res = json.loads(result.read_text()) | {
        "run": run,
        "gradient_checkpointing": checkpointing,
        "wall_s": took,
    }
    memory = f", peak {res['peak_gpu_mib']:,.0f} MiB" if "peak_gpu_mib" in res else ""
    print(
        f"  {run}: {res['supervised_tokens_per_s']:,.0f} supervised tok/s, {res['tokens_per_s']:,.0f} tok/s"
        f"{memory}, first loss {res['first_loss']:.3f} ({took:.0f} s)",
        flush=True,
    )
    return res


def parse_checkpointing(value: str) -> bool | str:
    """`False`/`True`/`mlp` as the config takes it."""
    return {"False": False, "True": True}.get(value, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="chatglm3-6b")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--runs", default=",".join([*RUNS, *CAPPED]), help="comma-separated subset")
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="fp32: a quick path check on AVX2-only CPUs",
    )
    p.add_argument("--seq", type=int, default=2048, help="max sequence length (and packed row length)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--short-rows", type=int, default=400)
    p.add_argument("--long-rows", type=int, default=120)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="AdvertiseGen JSON lines")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="ChatGLM3's tokenizer.model")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base-run", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", type=parse_checkpointing, default=False, help=argparse.SUPPRESS)
    p.add_argument("--cap", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    if unknown := set(runs) - set(RUNS) - set(CAPPED):
        p.error(f"unknown runs {sorted(unknown)}; choose from {', '.join([*RUNS, *CAPPED])}")
    a.workdir = Path(tempfile.mkdtemp(prefix="chattune-gpu-job-"))
    prepare(a)
    config = glm_config(a.shape)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        n_params = sum(t.numel() for t in AutoModelForCausalLM.from_config(config).parameters())
    device = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu"
    print(
        f"{device}: GlmForCausalLM {a.shape} ({n_params / 1e9:.2f} B parameters), {a.precision}, seq {a.seq}"
    )
    results = []
    for run in runs:
        if run in CAPPED:
            if a.device != "cuda":
                print(f"  {run}: skipped (the memory cap needs CUDA)")
                continue
            for checkpointing in CHECKPOINTING:  # the first setting that fits is the one users would want
                res = spawn(a, run, CAPPED[run], checkpointing, cap=True)
                if "exit" not in res:
                    res["fits_24gib"] = True
                    break
            else:
                res = {"run": run, "fits_24gib": False} | res
        else:
            res = spawn(a, run, run, False, cap=False)
            res.setdefault("run", run)
        results.append(res)
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "trl", "liger-kernel", "bitsandbytes"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    payload = {"device": device, "versions": versions, "shape": a.shape, "parameters": n_params, "seq": a.seq}
    payload |= {"precision": a.precision, "steps": a.steps, "runs": results}
    report(results)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(payload, indent=2))
    shutil.rmtree(a.workdir, ignore_errors=True)


def report(results: list[dict[str, Any]]) -> None:
    """The ratio the issue targets: chattune packed against TRL's best, speed and memory."""
    by_run = {r["run"]: r for r in results if "supervised_tokens_per_s" in r}
    ours, theirs = by_run.get("lora-packed"), by_run.get("trl-best")
    if ours and theirs:
        ratio = ours["supervised_tokens_per_s"] / theirs["supervised_tokens_per_s"]
        line = f"lora-packed / trl-best: supervised tok/s x{ratio:.2f} (target 1.0)"
        if "peak_gpu_mib" in ours:
            line += f", peak memory x{ours['peak_gpu_mib'] / theirs['peak_gpu_mib']:.2f} (target <= 1)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
