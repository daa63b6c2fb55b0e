"""Training throughput: chattune vs TRL's SFTTrainer on the same LoRA job, in one invocation.

The job: SmolLM2-135M-Instruct (fp32 on CPU, bf16 on CUDA; --precision sets it), LoRA r=8 alpha=16 dropout=0
(0.1 in the chattune-dropout run) on all linear layers,
the first N AdvertiseGen rows as prompt (content) -> completion (summary) with the loss on the completion only,
batch 8, max length 256, lr 2e-4, 1 epoch, seed 0, no eval, no checkpoints. The "batch" column reads
micro-batch x accumulation: chattune-4x2 takes the same 8 rows per optimizer step as two micro-batches of 4
(the loss is normalised by the step's supervised tokens either way, so the updates are the same).

Both frameworks see the same text: each content is cut (at a character boundary) to at most max_length/2
tokens and each summary to what is left minus one for eos, so that no sample exceeds max_length and neither
framework truncates (truncation would otherwise hit most rows, differently in each: chattune cuts prompt and
response separately, TRL cuts the joined sequence at the end).

Every run is a separate child process (this script with --child), so each run's peak RSS is its own:
ru_maxrss of the child, i.e. the lifetime peak including imports, data preparation and model load.
Measured per run:
- wall: Trainer's `train_runtime` (the `trainer.train()` loop, excluding model load and data preparation);
- tokens: counted on the batches the trainer actually consumed (a wrapped `training_step`): supervised =
  labels != -100, all = non-pad tokens (attention mask, or every token of a packed row);
- train loss: the epoch mean of the per-step losses (Trainer's `train_loss`), and the last step's loss;
- MFU: 4·N·T / (wall · peak) where N = the base model's parameters (the tied output head counted once),
  T = all tokens, and peak = the best matmul rate in the run's precision measured in the run's own process
  just before it loads the model and just after training ends (a shared machine's speed drifts over an
  invocation of an hour; a peak measured once at the start would not follow it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from chattune.system import available_cores

# chattune's runs: what each changes in chattune's job (below); the -glibc run differs in its malloc only
CHATTUNE_RUNS: dict[str, dict[str, Any]] = {
    "chattune": {},
    "chattune-4x2": {"batch_size": 4, "grad_accum": 2},  # the same 8 rows per optimizer step, in two halves
    "chattune-packing": {"packing": True},
    "chattune-gc": {"gradient_checkpointing": True},
    "chattune-mlpgc": {"gradient_checkpointing": "mlp"},
    "chattune-unfused": {"fuse_lora": False},
    "chattune-dropout": {"lora_dropout": 0.1},  # what LoRA dropout costs (chattune's default dropout)
    "chattune-glibc": {},
}
RUNS = (*CHATTUNE_RUNS, "trl", "trl-nogc", "trl-packing", "trl-tcmalloc", "trl-dropout")
# the malloc each run uses: chattune's own choice (what `chattune train` does: tcmalloc when installed), TRL as
# its users run it (glibc); the -glibc / -tcmalloc runs swap them, to show what the allocator alone is worth
ALLOCATOR = {"chattune-glibc": "system", "trl-tcmalloc": "tcmalloc"}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/seed000-advertisegen/dev.json"
MIB = 2**20
METRICS = (
    "wall_s",
    "sup_tok_s",
    "all_tok_s",
    "peak_rss_mib",
    "peak_gpu_mib",
    "train_loss",
    "last_loss",
    "peak_gflops",
    "mfu",
)


def allocator_for(run: str) -> str:
    """The malloc a run uses (see ALLOCATOR): chattune's own choice, or glibc for TRL, unless swapped."""
    return ALLOCATOR.get(run, "auto" if run.startswith("chattune") else "system")


def fit(text: str, tokenizer: Any, budget: int) -> str:
    """`text` cut at a character boundary so that it encodes to at most `budget` tokens."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= budget:
        return text
    text = text[: enc["offset_mapping"][budget][0]]
    while len(tokenizer.encode(text, add_special_tokens=False)) > budget:
        text = text[:-1]
    return text


def prepare_data(src: Path, rows: int, tokenizer: Any, max_length: int, out: Path) -> None:
    """First `rows` AdvertiseGen lines -> {"prompt", "response"} JSON lines that fit `max_length` with eos."""
    prompt_budget = max_length // 2
    with src.open(encoding="utf-8") as f, out.open("w", encoding="utf-8") as w:
        for line, _ in zip(f, range(rows), strict=False):
            row = json.loads(line)
            prompt = fit(row["content"], tokenizer, prompt_budget)
            response = fit(row["summary"], tokenizer, max_length - prompt_budget - 1)
            w.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")


# what the CPU offers for bf16 (and the AVX level): recorded with every invocation, since bf16 matmuls run
# 50-400x slower than fp32 without AVX-512-BF16 or AMX
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    """The CPU_FLAGS this machine's /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        listed = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in CPU_FLAGS if flag in listed]


def matmul_peak(device: str, precision: str, trials: int = 5, size: int = 2048) -> float:
    """Best GFLOP/s of a square matmul loop in `precision`: `size` on CPU (all cores), 8192 on CUDA."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n, reps = (8192, 20) if device == "cuda" else (size, 4)
    torch.set_num_threads(available_cores())
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for _ in range(trials + 1):  # the first trial warms up
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def model_shape_peak(
    model_dir: str, device: str, precision: str, tokens: int = 2048, trials: int = 7
) -> float:
    """Median GFLOP/s over `trials` of the model's own projection matmuls (every layer's q, k, v, o, gate,
    up and down, forward shapes) on `tokens` rows: the peak a training step's matmuls could reach here."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (
        getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.set_num_threads(available_cores())
    shapes = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
    ]
    shapes.append((inter, hidden))
    pairs = [
        (torch.randn(tokens, i, device=device, dtype=dtype), torch.randn(o, i, device=device, dtype=dtype))
        for i, o in shapes
    ]
    flops = sum(2 * tokens * i * o for i, o in shapes)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates = []
    for trial in range(trials + 1):  # the first trial warms up
        sync()
        t = time.perf_counter()
        for x, w in pairs:
            x @ w.T
        sync()
        if trial:
            rates.append(flops / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def count_tokens(trainer_cls: type, counts: dict[str, int]) -> None:
    """Wrap `trainer_cls.training_step` to count the supervised and non-pad tokens of each batch it trains on."""
    original = trainer_cls.training_step

    def training_step(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if not counts["all"]:  # model, data and optimizer ready, no activation yet
            counts["rss0"] = psutil.Process().memory_info().rss
        mask = inputs.get("attention_mask")
        counts["all"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        counts["sup"] += int((inputs["labels"] != -100).sum())
        return original(self, model, inputs, *args, **kwargs)

    trainer_cls.training_step = training_step


def run_chattune(a: argparse.Namespace, out: Path, counts: dict[str, int]) -> dict[str, Any]:
    """chattune's own recipe via run_training; timing and losses read back from its trainer_log.jsonl."""
    from chattune.config import build_config
    from chattune.train.run import run_training
    from chattune.train.trainer import ChattuneTrainer

    count_tokens(ChattuneTrainer, counts)
    prompt_budget = a.max_length // 2  # and the response gets the rest, less one token for eos
    job = {"model": a.model, "train_file": str(a.workdir / "data.jsonl"), "format": "prompt_response"}
    job |= {"template": "raw", "precision": a.precision}
    job |= {"max_source_len": prompt_budget, "max_target_len": a.max_length - prompt_budget - 1}
    job |= {
        "method": "lora",
        "lora_target": "all-linear",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
    }
    job |= {"batch_size": 8, "grad_accum": 1, "learning_rate": 2e-4, "epochs": 1, "max_steps": a.max_steps}
    job |= {"seed": 0, "report_to": "none", "save_steps": 10**9, "logging_steps": 1}
    job |= {"output_dir": str(out), "overwrite_output_dir": True} | CHATTUNE_RUNS[a.child]
    cfg = build_config(job)
    run_training(cfg)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    if "train_runtime" not in log[-1]:
        raise RuntimeError(f"no train_runtime in the last record of {out}/trainer_log.jsonl: {log[-1]}")
    losses = [r["loss"] for r in log if "loss" in r]
    gc, batch = cfg.gradient_checkpointing, f"{cfg.batch_size}x{cfg.grad_accum}"
    return {
        "wall_s": log[-1]["train_runtime"],
        "losses": losses,
        "steps": log[-1]["step"],
        "gc": gc,
        "batch": batch,
    }


def run_trl(a: argparse.Namespace, out: Path, counts: dict[str, int]) -> dict[str, Any]:
    """TRL's SFTTrainer on prompt/completion text (no chat template; TRL appends eos itself)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(available_cores())  # as chattune does
    rows = [json.loads(line) for line in (a.workdir / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]} for r in rows])
    job: dict[str, Any] = {"output_dir": str(out), "per_device_train_batch_size": 8, "learning_rate": 2e-4}
    job |= {"num_train_epochs": 1, "max_steps": a.max_steps or -1, "seed": 0, "max_length": a.max_length}
    job |= {"completion_only_loss": True, "packing": a.child == "trl-packing"}
    job |= {"bf16": a.precision == "bf16", "use_cpu": a.device == "cpu"}
    job |= {"model_init_kwargs": {"dtype": "bfloat16" if a.precision == "bf16" else "float32"}}
    job |= {"logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}
    if a.child == "trl-nogc":
        job["gradient_checkpointing"] = False  # TRL turns it on by default
    args = SFTConfig(**job)
    count_tokens(SFTTrainer, counts)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.1 if a.child == "trl-dropout" else 0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    trainer = SFTTrainer(a.model, args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    wall = trainer.train().metrics["train_runtime"]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    gc, batch = (
        args.gradient_checkpointing,
        f"{args.per_device_train_batch_size}x{args.gradient_accumulation_steps}",
    )
    return {"wall_s": wall, "losses": losses, "steps": trainer.state.global_step, "gc": gc, "batch": batch}


def child(a: argparse.Namespace) -> None:
    """One run in this process; writes its measurements to --result."""
    from chattune.system import current_allocator, use_allocator

    use_allocator(allocator_for(a.child))
    out = a.workdir / f"{a.child}-{a.rep}"
    counts = {"all": 0, "sup": 0, "rss0": 0}
    before = matmul_peak(a.device, a.precision, size=a.peak_size)
    res = (run_chattune if a.child.startswith("chattune") else run_trl)(a, out, counts)
    after = matmul_peak(a.device, a.precision, size=a.peak_size)
    res["precision"] = a.precision
    res |= {"peak_gflops": max(before, after), "peak_before_after": [before, after]}
    res |= {"tokens": counts["all"], "supervised": counts["sup"], "rss_first_step_mib": counts["rss0"] / MIB}
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    res["malloc"] = current_allocator()
    if a.device == "cuda":
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / MIB
    shutil.rmtree(out, ignore_errors=True)
    Path(a.result).write_text(json.dumps(res))


def spawn(a: argparse.Namespace, name: str, rep: int) -> dict[str, Any]:
    """Run `name` in a fresh interpreter; its output goes to a log file in the work dir."""
    result, log = a.workdir / f"{name}-{rep}.json", a.workdir / f"{name}-{rep}.log"
    cmd = [sys.executable, __file__, "--child", name, "--rep", str(rep), "--result", str(result)]
    cmd += ["--workdir", str(a.workdir), "--model", a.model, "--device", a.device, "--precision", a.precision]
    cmd += ["--max-length", str(a.max_length), "--peak-size", str(a.peak_size)]
    cmd += ["--max-steps", str(a.max_steps)] if a.max_steps else []
    env = os.environ | {"CHATTUNE_HOME": str(a.workdir / "home"), "HF_HUB_OFFLINE": "1"}
    env |= {"TOKENIZERS_PARALLELISM": "false"} | ({"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {})
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        sys.exit(f"run {name} failed (exit {code}); the end of {log}:\n{log.read_text()[-3000:]}")
    return json.loads(result.read_text())


def summarise(res: dict[str, Any], n_params: int) -> dict[str, Any]:
    """Derived metrics of one run (MFU against the peak measured in the run's own process)."""
    wall = res["wall_s"]
    return res | {
        "sup_tok_s": res["supervised"] / wall,
        "all_tok_s": res["tokens"] / wall,
        "train_loss": statistics.fmean(res["losses"]),
        "last_loss": res["losses"][-1],
        "mfu": 4 * n_params * res["tokens"] / wall / (res["peak_gflops"] * 1e9),
    }


def report(results: dict[str, dict[str, Any]], peak: float, device: str, precision: str) -> None:
    """The table, then chattune's ratios to the TRL baselines."""
    from rich.console import Console
    from rich.table import Table

    flags = " ".join(cpu_flags()) or "none listed"
    table = Table(title=f"LoRA training throughput ({device}, {precision}; CPU flags: {flags}; medians)")
    table.add_column("run")
    for h in (
        "prec",
        "batch",
        "GC",
        "malloc",
        "wall s",
        "sup tok/s",
        "all tok/s",
        "RSS MiB",
        "train loss",
        "last loss",
        "steps",
        "peak GFLOP/s",
        "MFU",
    ):
        table.add_column(h, justify="right")
    for name, r in results.items():
        row = [
            f"{r['wall_s']:.1f}",
            f"{r['sup_tok_s']:,.0f}",
            f"{r['all_tok_s']:,.0f}",
            f"{r['peak_rss_mib']:,.0f}",
        ]
        row += [f"{r['train_loss']:.4f}", f"{r['last_loss']:.4f}", str(r["steps"])]
        row += [f"{r['peak_gflops']:,.1f}", f"{100 * r['mfu']:.1f}%"]
        gc = {True: "yes", False: "no"}.get(r["gc"], str(r["gc"]))  # or "mlp"
        table.add_row(name, r["precision"], r.get("batch", "8x1"), gc, r.get("malloc", "?"), *row)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(
        f"matmul peak ({precision}): {peak:,.1f} GFLOP/s at the start; each run's MFU uses the best of its own "
        "process's measurements just before loading and just after training (the 'peak' column)",
        highlight=False,
    )
    for ours in (n for n in results if n.startswith("chattune")):
        for base in (n for n in ("trl", "trl-nogc") if n in results):
            c, t = results[ours], results[base]
            sup, rss = c["sup_tok_s"] / t["sup_tok_s"], c["peak_rss_mib"] / t["peak_rss_mib"]
            loss = c["train_loss"] / t["train_loss"] - 1
            goal = 1.7 if base == "trl" else 1.5
            console.print(
                f"{ours} / {base}: supervised tok/s x{sup:.2f} {mark(sup >= goal)} (target {goal}), "
                f"all tok/s x{c['all_tok_s'] / t['all_tok_s']:.2f}, peak RSS x{rss:.2f} {mark(rss <= 0.5)} "
                f"(target 0.5), train loss {100 * loss:+.1f}% {mark(abs(loss) <= 0.02)} (target ±2%)",
                highlight=False,
            )
        mfu = results[ours]["mfu"]
        console.print(f"{ours} MFU {100 * mfu:.1f}% {mark(mfu >= 0.6)} (target 60%)", highlight=False)
    tokens = {n: (r["supervised"], r["tokens"]) for n, r in results.items()}
    console.print(f"tokens trained on (supervised, all): {tokens}", highlight=False)
    if device == "cuda":
        gpu = {n: round(r["peak_gpu_mib"]) for n, r in results.items()}
        console.print(f"peak GPU memory allocated (MiB): {gpu}", highlight=False)


def report_dropout(results: dict[str, dict[str, Any]], shape_peak: float, n_params: int) -> None:
    """Issue 20's targets for chattune's default dropout (0.1), where those runs were made: the cost of
    dropout, chattune against TRL with the same dropout, and MFU against the model-shape matmul peak
    measured at the start (targets for bf16 on AVX-512-BF16/AMX CPUs; printed for any machine)."""
    ours = results.get("chattune-dropout")
    if ours is None:
        return
    lines = []
    if "chattune" in results:
        cost = ours["wall_s"] / results["chattune"]["wall_s"] - 1
        lines.append(f"dropout 0.1 costs {100 * cost:+.1f}% over 0 {mark(cost <= 0.10)} (target +10%)")
    if "trl-dropout" in results:
        ratio = ours["sup_tok_s"] / results["trl-dropout"]["sup_tok_s"]
        lines.append(
            f"chattune-dropout / trl-dropout: supervised tok/s x{ratio:.2f} {mark(ratio >= 3)} (target 3)"
        )
    for name in ("chattune", "chattune-dropout", "trl-dropout"):
        if name in results:
            r = results[name]
            mfu = 4 * n_params * r["tokens"] / r["wall_s"] / (shape_peak * 1e9)
            goal = f" {mark(mfu >= 0.3)} (target 30%)" if name == "chattune-dropout" else ""
            lines.append(
                f"{name}: {100 * mfu:.1f}% of the model-shape peak ({shape_peak:,.1f} GFLOP/s){goal}"
            )
    from rich.console import Console

    console = Console(width=max(Console().width, 120))
    for line in lines:
        console.print(line, highlight=False)


def mark(ok: bool) -> str:
    """Whether a target is met, as one word."""
    return "[green]ok[/]" if ok else "[red]MISSED[/]"


def param_count(model_dir: str) -> int:
    """The model's parameters (tied weights once), counted on the meta device without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(t.numel() for t in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=128, help="first N rows of the data")
    p.add_argument("--model", default="smollm2-135m-instruct", help="chattune alias or model dir")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--repeat", type=int, default=1, help="run each K times, report medians")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument(
        "--peak-size",
        type=int,
        default=2048,
        help="CPU matmul peaks: the square matmul's size and the model-shape rows (smaller for bf16 on AVX2)",
    )
    p.add_argument(
        "--precision",
        choices=("default", "auto", "fp32", "bf16"),
        default="default",
        help="every run's precision: default = fp32 on CPU, bf16 on CUDA; auto = chattune's choice "
        "(bf16 on CPUs with AVX-512-BF16 or AMX)",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="AdvertiseGen JSON lines")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, logs and results here")
    p.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    from transformers import AutoTokenizer

    from chattune.models.load import pick_precision, resolve_path

    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    if unknown := set(runs) - set(RUNS):
        p.error(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    a.model = resolve_path(a.model)
    if a.precision == "default":
        a.precision = "bf16" if a.device == "cuda" else "fp32"
    elif a.precision == "auto":
        a.precision = pick_precision("auto")
    keep = a.workdir is not None
    a.workdir = (a.workdir or Path(tempfile.mkdtemp(prefix="chattune-bench-"))).resolve()
    a.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    prepare_data(a.data, a.rows, tokenizer, a.max_length, a.workdir / "data.jsonl")
    n_params, peak = param_count(a.model), matmul_peak(a.device, a.precision, size=a.peak_size)
    shape_peak = model_shape_peak(a.model, a.device, a.precision, tokens=a.peak_size)
    print(
        f"{len(runs)} runs x {a.repeat} in {a.workdir}; N = {n_params:,}; {a.precision}; CPU flags "
        f"{' '.join(cpu_flags()) or 'none listed'}; peak {peak:,.1f} GFLOP/s; the model's projection "
        f"shapes at {a.peak_size} rows: {shape_peak:,.1f} GFLOP/s (median of 7)"
    )

    raw: dict[str, list[dict[str, Any]]] = {r: [] for r in runs}
    for rep in range(a.repeat):  # interleaved, so drift in machine load spreads over all runs
        for name in runs:
            t = time.perf_counter()
            raw[name].append(summarise(spawn(a, name, rep), n_params))
            took, r = time.perf_counter() - t, raw[name][-1]
            peaks = "/".join(f"{p:.0f}" for p in r["peak_before_after"])
            print(
                f"  {name} #{rep}: {r['wall_s']:.1f} s training, {took:.0f} s all, "
                f"peak before/after {peaks} GFLOP/s, MFU {100 * r['mfu']:.1f}%",
                flush=True,
            )
    results = {
        name: rs[0] | {m: statistics.median(r[m] for r in rs) for m in METRICS if m in rs[0]}
        for name, rs in raw.items()
    }
    report(results, peak, a.device, a.precision)
    report_dropout(results, shape_peak, n_params)
    if a.json:
        settings = {k: str(v) for k, v in vars(a).items() if k not in ("child", "rep", "result")}
        payload = {
            "settings": settings,
            "n_params": n_params,
            "peak_gflops": peak,
            "model_shape_peak_gflops": shape_peak,
            "cores": available_cores(),
            "precision": a.precision,
            "cpu_flags": cpu_flags(),
        }
        a.json.write_text(json.dumps(payload | {"medians": results, "runs": raw}, indent=2))
    if not keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
