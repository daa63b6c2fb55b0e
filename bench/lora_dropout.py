"""What LoRA dropout costs the fused LoRA functions: keep masks, and a SwiGLU MLP block's forward + backward.

All in one process, the variants of each measurement interleaved round by round, medians (and minima) of
the rounds in milliseconds: a shared machine's speed drifts, so only ratios within one invocation mean much.

- masks: `rand_like(x) >= p` (chattune's mask before: one 32-bit draw and one float per element), a uint8
  tensor's `random_()` (one draw per byte), and keep_mask (random bytes eight to a 64-bit word), alone and
  with its 1/0 form in the input's dtype, for SmolLM2-135M's widths (576, 1536) at 2048 tokens.
- block: SmolLM2-135M's MLP block (576 -> 1536 -> 576) with LoRA r=8 on gate/up/down, peft's modules
  replaced by the fused SwiGLU function, forward + backward of `tokens` rows, at dropout 0, at dropout 0.1 with
  the rand_like mask, with keep_mask's bytes applied as a bool mask (a multiply that mixes dtypes: chattune
  before), and with keep_mask as the functions use it (1/0 in the input's dtype where applied). fp32 at
  2048 tokens; bf16 (base in bf16, adapters in
  fp32 as peft keeps them) at --bf16-tokens, as bf16 matmuls are slow on a CPU without AVX-512-BF16/AMX.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from chattune.models import fused_lora, fused_mlp

SHAPES = ((2048, 576), (2048, 1536))


def rand_like_mask(like: torch.Tensor, p: float) -> torch.Tensor | None:
    """The keep mask chattune drew before keep_mask: one uniform float per element."""
    return None if p == 0 else torch.rand_like(like) >= p


class BoolMask(fused_lora.KeepMask):
    """A bool keep mask in the form the fused functions take (applied as a bool, as chattune did before)."""

    def __init__(self, kept: torch.Tensor):
        super().__init__(kept, 1)

    def of(self, dtype: torch.dtype) -> torch.Tensor:
        return self.bytes


def rand_like_keep_mask(like: torch.Tensor, p: float) -> BoolMask | None:
    """rand_like_mask for the fused functions."""
    return None if p == 0 else BoolMask(rand_like_mask(like, p))


def bool_keep_mask(like: torch.Tensor, p: float) -> BoolMask | None:
    """keep_mask's bytes turned into a bool mask and multiplied as one (chattune before byte-to-float masks)."""
    mask = fused_lora.keep_mask(like, p)
    return None if mask is None else BoolMask(mask.kept)


def uint8_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A byte mask from a uint8 tensor's own random_(): one generator call per byte."""
    return torch.empty(like.shape, dtype=torch.uint8, device=like.device).random_() >= round(p * 256)


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Mean milliseconds of `reps` calls of `fn`, after one call to warm up."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, reps: int) -> dict[str, list[float]]:
    """Each variant timed once per round, in turn, so that drift in the machine's speed hits them all."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, reps))
    return times


def show(title: str, times: dict[str, list[float]], base: str) -> None:
    """One line per variant: median and minimum ms, and the median's ratio to `base`'s."""
    print(title)
    ref = statistics.median(times[base])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:28s} median {med:8.2f} ms  min {min(ts):8.2f} ms  x{med / ref:.2f} of {base}")


def mlp_block(dtype: torch.dtype, p: float) -> torch.nn.Module:
    """SmolLM2-135M's MLP block with peft LoRA (r=8, alpha 16, dropout p) on gate/up/down, fused."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.mlp = LlamaMLP(LlamaConfig(hidden_size=576, intermediate_size=1536))
    holder.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=list(fused_mlp.PROJECTIONS))
    inject_adapter_in_model(lora, holder)
    holder.to(dtype)
    for name, param in holder.named_parameters():
        if "lora_" in name:  # fp32 adapters on a bf16 base, as peft keeps them and chattune trains
            param.data = param.data.float()
            torch.nn.init.normal_(param, std=0.02)
    assert fused_mlp.fuse_lora_mlps(holder) == 1
    return holder.train()


def block_step(block: torch.nn.Module, x: torch.Tensor, mask: Callable) -> Callable[[], None]:
    """One forward + backward of the fused block, drawing dropout masks with `mask`."""

    def step() -> None:
        fused_mlp.keep_mask = mask  # the fused function looks it up at call time
        block.mlp(x).sum().backward()
        block.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--bf16-tokens", type=int, default=128, help="rows of the bf16 block step")
    p.add_argument("--p", type=float, default=0.1, help="dropout probability")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    p_q = fused_lora.quantised(a.p)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, p {a.p} (keep_mask: {p_q:.5f})")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            x, both = torch.randn(shape, dtype=dtype), torch.empty(2 * shape[0], shape[1], dtype=dtype)
            variants = {
                "rand_like >= p": lambda x=x: rand_like_mask(x, a.p),
                "uint8 random_()": lambda x=x: uint8_mask(x, p_q),
                "keep_mask (int64 bytes)": lambda x=x: fused_lora.keep_mask(x, p_q),
                "keep_mask, 1/0 in x's dtype": lambda x=x: fused_lora.keep_mask(x, p_q).of(x.dtype),
                "keep_mask, as bools": lambda x=x: fused_lora.keep_mask(x, p_q).kept,
                "keep_mask x2 (gate, up)": lambda x=x: (
                    fused_lora.keep_mask(x, p_q),
                    fused_lora.keep_mask(x, p_q),
                ),
                "keep_mask, one 2x draw": lambda b=both: fused_lora.keep_mask(b, p_q).bytes.chunk(2),
            }
            show(f"masks {tuple(shape)} {dtype}:", interleaved(variants, a.rounds, 5), "rand_like >= p")
    keep = fused_lora.keep_mask
    for dtype, tokens, rounds in ((torch.float32, 2048, a.rounds), (torch.bfloat16, a.bf16_tokens, 5)):
        x = torch.randn(tokens, 576, dtype=dtype, requires_grad=True)
        plain, dropout = mlp_block(dtype, 0.0), mlp_block(dtype, a.p)
        variants = {
            "dropout 0": block_step(plain, x, keep),
            f"dropout {a.p}, rand_like": block_step(dropout, x, rand_like_keep_mask),
            f"dropout {a.p}, bool keep_mask": block_step(dropout, x, bool_keep_mask),
            f"dropout {a.p}, keep_mask": block_step(dropout, x, keep),
        }
        title = f"fused MLP block forward + backward, {tokens} x 576 {dtype}:"
        show(title, interleaved(variants, rounds, 3 if dtype == torch.float32 else 1), "dropout 0")
    fused_mlp.keep_mask = keep


if __name__ == "__main__":
    main()
