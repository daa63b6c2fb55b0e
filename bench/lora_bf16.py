"""The LoRA adapters' side of a bf16 training step: rank-r path in fp32 (peft's way) or in bf16 (chattune's on
hardware with fast bf16 matmuls).

peft keeps the adapters in fp32 over a bf16 base, so every adapted projection converts its input to fp32,
its output to fp32 and back, and in backward its output gradient to fp32, its input again, and the input
gradient's adapter term back to bf16: wide elementwise passes that cost as much as the bf16 matmul beside
them on an AMX CPU. chattune's fused functions compute the rank-r path in bf16 from the fp32 weights there
(fused_lora.rank_dtype_for).

What this measures, in one process, variants interleaved round by round, medians in milliseconds:

- adapter side: `adapter_forward` + `adapter_backward` (everything the fused projection does beyond the
  base matmuls x W^T and dy W, which both variants share) for each of SmolLM2-135M's projection shapes at
  `--tokens` rows, rank-r path fp32 vs bf16, at dropout 0 and 0.1; then the same summed over one training
  step (30 layers x q, k, v, o, gate, up, down; gate and up share one input conversion in the fused MLP,
  which this per-projection sum does not credit).
- base: the bf16 base matmuls of one step at the same shapes (forward x W^T and input gradient dy W), to
  set the adapter side against. On a CPU without AVX-512-BF16/AMX these run 50-400x slower than on one with.

The CPU's flags and torch's thread count are printed first; only the ratios within one invocation mean much.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from lora_dropout import interleaved, show
from train_throughput import cpu_flags

from chattune.models import fused_lora

# SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, intermediate 1536, 30 layers
PROJECTIONS = {
    "q, o": (576, 576, 2),
    "k, v": (576, 192, 2),
    "gate, up": (576, 1536, 2),
    "down": (1536, 576, 1),
}
LAYERS = 30


def adapter_step(
    n: int, width_in: int, width_out: int, rank_dtype: torch.dtype, p: float
) -> Callable[[], None]:
    """One projection's adapter side, forward and backward, with the base's output and input gradient given."""
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    w = torch.randn(width_out, width_in, dtype=bf16) * width_in**-0.5
    a = torch.randn(8, width_in) * width_in**-0.5
    b = torch.randn(width_out, 8) * 0.02
    proj = fused_lora.Adapted(w, a, b, 2.0, fused_lora.quantised(p), rank_dtype=rank_dtype)
    x, dy = torch.randn(n, width_in, dtype=bf16), torch.randn(n, width_out, dtype=bf16)
    base, dx = torch.randn(n, width_out, dtype=bf16), torch.randn(n, width_in, dtype=bf16)

    def step() -> None:
        mask = fused_lora.keep_mask(x, proj.p)
        # the base path's outputs are fresh tensors in the fused function; copies stand in for them here
        _, xa = fused_lora.adapter_forward(base.clone(), x, proj, mask, None)
        fused_lora.adapter_backward(dy, x, xa, proj, mask, dx.clone(), None)

    return step


def base_step(n: int, width_in: int, width_out: int) -> Callable[[], None]:
    """The frozen bf16 base's matmuls of one projection: x W^T forward and dy W for the input gradient."""
    w = torch.randn(width_out, width_in, dtype=torch.bfloat16)
    x, dy = torch.randn(n, width_in, dtype=torch.bfloat16), torch.randn(n, width_out, dtype=torch.bfloat16)
    return lambda: (x @ w.T, dy @ w)


def copies(n: int, width_in: int, width_out: int) -> Callable[[], None]:
    """The two copies adapter_step makes of the base's outputs (subtracted from its times)."""
    base, dx = torch.empty(n, width_out, dtype=torch.bfloat16), torch.empty(n, width_in, dtype=torch.bfloat16)
    return lambda: (base.clone(), dx.clone())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows (tokens per step: batch x length)")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--p", type=float, default=0.1, help="the dropout probability besides 0")
    parser.add_argument("--skip-base", action="store_true", help="skip the bf16 base matmuls (slow on AVX2)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {' '.join(cpu_flags())}")
    totals: dict[str, float] = {}
    for name, (width_in, width_out, count) in PROJECTIONS.items():
        variants = {"copies (subtracted)": copies(n, width_in, width_out)}
        for p in (0.0, args.p):
            for dtype in (torch.float32, torch.bfloat16):
                label = f"rank-r {str(dtype)[6:]}, dropout {p:g}"
                variants[label] = adapter_step(n, width_in, width_out, dtype, p)
        if not args.skip_base:
            variants["base matmuls (bf16)"] = base_step(n, width_in, width_out)
        times = interleaved(variants, args.rounds, 3)
        show(
            f"{name}: {n} x {width_in} -> {width_out}, adapter side forward + backward",
            times,
            "copies (subtracted)",
        )
        copy = statistics.median(times.pop("copies (subtracted)"))
        for label, ts in times.items():
            own = statistics.median(ts) - (0 if label.startswith("base") else copy)
            totals[label] = totals.get(label, 0.0) + own * count * LAYERS
    print(f"one step ({LAYERS} layers x 7 projections, {n} tokens), ms:")
    for label, total in totals.items():
        print(f"  {label:28s} {total:9.1f}")
    for p in (0.0, args.p):
        fp32, bf16 = totals[f"rank-r float32, dropout {p:g}"], totals[f"rank-r bfloat16, dropout {p:g}"]
        print(f"  dropout {p:g}: rank-r bf16 / fp32 = x{bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
