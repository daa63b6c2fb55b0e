"""The elementwise regions of a LoRA step at the bench job's shapes: eager (transformers' / chattune's own code)
against hand-written eager variants and `torch.compile` (inductor, CPU), forward + backward, fp32 and bf16.

Issue 20: on CPUs with AMX, bf16 matmuls run ~8x faster than fp32, so the elementwise work around them (norms,
rotary, SwiGLU, residual adds, the loss) becomes a large part of a step. This measures what fusing it buys.

The regions, at SmolLM2-135M's shapes for one micro-batch of `--batch` x `--seq` tokens (the bench job: 8 x 256;
hidden 576, 9 query / 3 key-value heads of 64, intermediate 1536, vocabulary 49152), each forward + backward:
- rmsnorm: LlamaRMSNorm on the residual stream, frozen weight (as in LoRA); 61 per step;
- rotary: transformers' apply_rotary_pos_emb on q and k in the model's layout (a transposed view); 30 per step;
- swiglu: the elementwise part of chattune's fused LoRA MLP (fused_mlp._LoraSwiGLU): forward silu(g) * u,
  backward h = silu(g) * u again, du, dg from g, u and dh; 30 per step;
- add_norm: residual add + LlamaRMSNorm (the decoder layer's `residual + out` then the next norm); 60 per step;
- loss: the elementwise part of chattune's chunked head loss (train/loss.py) on `--trained` rows: logits ->
  summed cross-entropy and the logits' gradient, in chunks of 256 rows; once per step.
Variants: `eager` (the code as it is on main), `rms_norm` (torch.nn.functional.rms_norm: in torch 2.13 a
composite of the same operations on CPU, no fused kernel), `hand` (hand-written eager with fewer passes:
chattune.models.fused_norm.rms_norm for the norms, chattune.train.loss.cross_entropy_and_grad_ for the loss,
and for rotary and SwiGLU the functions below, measured but not adopted), `compiled` (torch.compile of the
eager code, default dynamic handling: a recompile at the second length, dynamic after) and `compiled-dyn`
(dynamic=True).

One process, the variants of a region interleaved round by round (`--rounds`), each timed on one call of
forward + backward (inputs prepared outside the timer); medians and ratio eager / variant (> 1: faster).
Compile: the first call of each compiled variant minus its median (TORCHINDUCTOR_CACHE_DIR: `--cache-dir`,
a new temp dir by default = cold; run again with the same dir for the warm time), then the calls at
`--lengths` other sequence lengths (recompiles show as calls far above the median). The per-step saving is
per-call saving x calls per step; the break-even is compile seconds / per-step saving.

    python bench/elementwise.py                              # fp32 and bf16, all regions, cold compile
    python bench/elementwise.py --cache-dir /tmp/ind         # then again with the same dir: warm compile
    LD_PRELOAD=libtcmalloc_minimal.so.4 python bench/elementwise.py   # as `chattune train` runs

Run it with --threads equal to what training uses on an idle machine for absolute numbers; the ratios are
what this script is for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from train_throughput import cpu_flags
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from chattune.models.fused_norm import rms_norm
from chattune.train.loss import cross_entropy_and_grad_

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, CHUNK = 576, 9, 3, 64, 1536, 49152, 256
CALLS_PER_STEP = {"rmsnorm": 61, "rotary": 30, "swiglu": 30, "add_norm": 60, "loss": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--regions", nargs="+", default=list(CALLS_PER_STEP), choices=list(CALLS_PER_STEP))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--trained", type=int, default=1024, help="trained positions per micro-batch (loss rows)"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--cache-dir", help="TORCHINDUCTOR_CACHE_DIR (default: a new temp dir, a cold compile)"
    )
    parser.add_argument(
        "--lengths", type=int, nargs="*", default=[200, 131, 256, 77], help="seq lengths after"
    )
    args = parser.parse_args()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # inductor reads it when it compiles
    torch.set_num_threads(args.threads)
    allocator = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default"
    flags = " ".join(cpu_flags()) or "none listed"
    print(f"torch {torch.__version__}  threads {args.threads}  malloc {allocator}  CPU flags: {flags}")
    print(f"inductor cache: {cache}  tokens {args.batch}x{args.seq}  rounds {args.rounds}\n")
    rows = []
    for dtype_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        for region in args.regions:
            rows += bench_region(region, dtype_name, dtype, args)
    print(
        f"\n{'region':9} {'dtype':5} {'variant':13} {'median ms':>9} {'x eager':>8} {'save/step ms':>12} "
        f"{'compile s':>9} {'break-even steps':>16}  recompiles at --lengths"
    )
    for r in rows:
        print(
            f"{r['region']:9} {r['dtype']:5} {r['variant']:13} {r['ms']:9.3f} {r['ratio']:8.2f} "
            f"{r['save_ms']:12.1f} {r['compile_s']:>9} {r['break_even']:>16}  {r['recompiles']}"
        )


def timed(fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> float:
    if setup is not None:
        setup()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_region(region: str, dtype_name: str, dtype: Any, args: Any) -> list[dict[str, Any]]:
    make = REGIONS[region]
    variants: dict[str, Callable[[], Any]] = {}
    setups: dict[str, Callable[[], Any] | None] = {}
    for name in make(None, dtype, args, 0):
        if name.startswith("compiled") and args.no_compile:
            continue
        fn, setup = make(name, dtype, args, args.seq)
        variants[name], setups[name] = fn, setup
    compile_s: dict[str, float] = {}
    for name, fn in variants.items():  # the first call: compiles the compiled variants
        compile_s[name] = timed(fn, setups[name])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, setups[name]))
    med = {name: statistics.median(t) for name, t in times.items()}
    out = []
    for name in variants:
        ratio = med["eager"] / med[name]
        save_ms = (med["eager"] - med[name]) * 1e3 * CALLS_PER_STEP[region] * (args.batch * args.seq) / 2048
        first = compile_s[name] - med[name]
        recompiles = ""
        if name.startswith("compiled"):
            calls = []
            for length in args.lengths:
                fn, setup = make(name, dtype, args, length)
                calls.append(f"{length}:{timed(fn, setup):.2f}s")
            recompiles = " ".join(calls)
        out.append(
            {
                "region": region,
                "dtype": dtype_name,
                "variant": name,
                "ms": med[name] * 1e3,
                "ratio": ratio,
                "save_ms": save_ms,
                "compile_s": f"{first:.1f}" if name.startswith("compiled") else "",
                "break_even": (f"{first / (save_ms / 1e3):.0f}" if save_ms > 0 else "never")
                if name.startswith("compiled")
                else "",
                "recompiles": recompiles,
            }
        )
        print(f"{region:9} {dtype_name:5} {name:13} {med[name] * 1e3:8.3f} ms  x{ratio:.2f}", flush=True)
    torch.compiler.reset()
    return out


# --- hand-written eager variants measured here but not adopted in chattune (see the module docstring)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x cos + sign * rotate_half(x) sin, on the halves (no concatenated copy)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=o1)
    o1.addcmul_(x2, sin[..., :half], value=-sign)
    torch.mul(x2, cos[..., half:], out=o2)
    o2.addcmul_(x1, sin[..., half:], value=sign)
    return out


def _rotate_back(d: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of _rotate: dx1 = d1 c1 + d2 s2, dx2 = d2 c2 - d1 s1."""
    half = d.shape[-1] // 2
    d1, d2 = d[..., :half], d[..., half:]
    out = torch.empty_like(d)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(d1, cos[..., :half], out=o1)
    o1.addcmul_(d2, sin[..., half:])
    torch.mul(d2, cos[..., half:], out=o2)
    o2.addcmul_(d1, sin[..., :half], value=-1.0)
    return out


class _Rotary(torch.autograd.Function):
    """apply_rotary_pos_emb with a hand-written backward (the transposed rotation), on the halves."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1.0), _rotate(k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_back(dq, cos, sin), _rotate_back(dk, cos, sin), None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    return _Rotary.apply(q, k, cos, sin)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def swiglu_grads(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sig = torch.sigmoid(g)
    act = g * sig
    return dh * act, dh * u * (sig * (1 + g * (1 - sig)))


def swiglu_backward_eager(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor) -> tuple:
    sig = torch.sigmoid(g)
    act = g * sig
    h = act * u
    du = dh * act
    # silu'(g) = sig + act (1 - sig) = sig + act - act sig
    dsilu = torch.addcmul(act, act, sig, value=-1.0).add_(sig)
    dg = dh.mul_(u).mul_(dsilu)
    return h, du, dg


# --- the regions: make(variant, dtype, args, seq) -> (fn, setup); make(None, ...) -> the variant names


def _compiled(fn: Callable, name: str) -> Callable:
    return torch.compile(fn, dynamic=True if name == "compiled-dyn" else None)


_CACHE: dict[str, Callable] = {}


def _compiled_once(key: str, fn: Callable, name: str) -> Callable:
    """One compiled callable per (region, variant, dtype), reused across lengths (so recompiles show)."""
    if key not in _CACHE:
        _CACHE[key] = _compiled(fn, name)
    return _CACHE[key]


def rmsnorm_region(name: str | None, dtype: Any, args: Any, seq: int) -> Any:
    if name is None:
        return ["eager", "rms_norm", "hand", "compiled", "compiled-dyn"]
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5).to(dtype).requires_grad_(False)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = torch.randn(args.batch, seq, HIDDEN, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    forward = {
        "eager": norm.forward,
        "rms_norm": lambda t: torch.nn.functional.rms_norm(t, (HIDDEN,), norm.weight, 1e-5),
        "hand": lambda t: rms_norm(t, norm.weight, 1e-5),
    }.get(name) or _compiled_once(f"rmsnorm{name}{dtype}", norm.forward, name)

    def fn() -> None:
        forward(x).backward(dy)

    return fn, lambda: setattr(x, "grad", None)


def rotary_region(name: str | None, dtype: Any, args: Any, seq: int) -> Any:
    if name is None:
        return ["eager", "hand", "compiled", "compiled-dyn"]
    b = args.batch
    qp = torch.randn(b, seq, HEADS * HEAD_DIM, dtype=dtype, requires_grad=True)
    kp = torch.randn(b, seq, KV_HEADS * HEAD_DIM, dtype=dtype, requires_grad=True)
    freqs = torch.arange(seq)[:, None] * (10000.0 ** (-torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos()[None].expand(b, -1, -1).to(dtype), emb.sin()[None].expand(b, -1, -1).to(dtype))
    dq = torch.randn(b, HEADS, seq, HEAD_DIM, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    dk = torch.randn(b, KV_HEADS, seq, HEAD_DIM, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    rope = {"eager": apply_rotary_pos_emb, "hand": apply_rotary}.get(name) or _compiled_once(
        f"rotary{name}{dtype}", apply_rotary_pos_emb, name
    )

    def fn() -> None:
        q = qp.view(b, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = kp.view(b, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        qe, ke = rope(q, k, cos, sin)
        torch.autograd.backward((qe, ke), (dq, dk))

    return fn, lambda: (setattr(qp, "grad", None), setattr(kp, "grad", None))


def swiglu_region(name: str | None, dtype: Any, args: Any, seq: int) -> Any:
    if name is None:
        return ["eager", "hand", "compiled", "compiled-dyn"]
    n = args.batch * seq
    g, u, dh0 = (torch.randn(n, INTER, dtype=dtype) for _ in range(3))
    dh = torch.empty_like(dh0)

    def eager_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor) -> tuple:
        # fused_mlp._LoraSwiGLU.backward's elementwise lines, as they are
        sig = torch.sigmoid(g)
        act = g * sig
        h = act * u
        du = dh * act
        dg = dh.mul_(u).mul_(sig * (1 + g * (1 - sig)))
        return h, du, dg

    if name == "eager":
        silu_mul, backward = (lambda g, u: F.silu(g).mul_(u)), eager_backward
    elif name == "hand":
        silu_mul, backward = silu_mul, swiglu_backward_eager
    else:
        silu_mul = _compiled_once(f"swiglu-f{name}{dtype}", silu_mul, name)
        grads = _compiled_once(f"swiglu-b{name}{dtype}", swiglu_grads, name)

        def backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor) -> tuple:
            return (silu_mul(g, u), *grads(g, u, dh))

    def fn() -> None:
        silu_mul(g, u)  # forward
        backward(g, u, dh)

    return fn, lambda: dh.copy_(dh0)


def add_norm_region(name: str | None, dtype: Any, args: Any, seq: int) -> Any:
    if name is None:
        return ["eager", "hand", "compiled", "compiled-dyn"]
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5).to(dtype).requires_grad_(False)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    res = torch.randn(args.batch, seq, HIDDEN, dtype=dtype, requires_grad=True)
    out = torch.randn_like(res, requires_grad=True)
    dh, dn = torch.randn_like(res), torch.randn_like(res)

    def eager(res: torch.Tensor, out: torch.Tensor) -> tuple:
        h = res + out
        return h, norm(h)

    def hand(res: torch.Tensor, out: torch.Tensor) -> tuple:
        h = res + out
        return h, rms_norm(h, norm.weight, 1e-5)

    region = {"eager": eager, "hand": hand}.get(name) or _compiled_once(f"addnorm{name}{dtype}", eager, name)

    def fn() -> None:
        h, y = region(res, out)
        torch.autograd.backward((h, y), (dh, dn))

    return fn, lambda: (setattr(res, "grad", None), setattr(out, "grad", None))


def loss_region(name: str | None, dtype: Any, args: Any, seq: int) -> Any:
    if name is None:
        return ["eager", "hand", "compiled", "compiled-dyn"]
    rows = args.trained * seq // args.seq
    logits0 = (torch.randn(rows, VOCAB) * 3).to(dtype)
    targets = torch.randint(0, VOCAB, (rows,))
    buffers = [torch.empty(CHUNK, VOCAB, dtype=dtype) for _ in range(0, rows, CHUNK)]

    def eager(logits: torch.Tensor, t: torch.Tensor) -> tuple:
        # train/loss.py _ChunkedHeadCrossEntropy.forward's elementwise lines, as they are
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        total = (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        probs = logits.sub_(lse[:, None]).exp_()
        probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
        return total, probs.to(dtype)

    chunk = {"eager": eager, "hand": cross_entropy_and_grad_}.get(name) or _compiled_once(
        f"loss{name}{dtype}", eager, name
    )

    def setup() -> None:
        for i, buf in enumerate(buffers):
            n = min(CHUNK, rows - i * CHUNK)
            buf[:n].copy_(logits0[i * CHUNK : i * CHUNK + n])

    def fn() -> None:
        for i, buf in enumerate(buffers):
            n = min(CHUNK, rows - i * CHUNK)
            chunk(buf[:n], targets[i * CHUNK : i * CHUNK + n])

    return fn, setup


REGIONS = {
    "rmsnorm": rmsnorm_region,
    "rotary": rotary_region,
    "swiglu": swiglu_region,
    "add_norm": add_norm_region,
    "loss": loss_region,
}

if __name__ == "__main__":
    sys.exit(main())
