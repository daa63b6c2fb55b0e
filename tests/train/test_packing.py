"""Packed rows (no padding, attention kept within each sample) give the same logits and loss as padded batches."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import DTYPES

from chattune.data.batching import PackedCollator, PadCollator
from chattune.models.attention import register_packed_attention


def rows():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (7, 12, 4):
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


# Packed and padded rows reach the same logits through different attention calls (one long row with a
# per-sample mask vs a batch of short rows), so matmuls and softmax sum in other orders and shapes.
# fp32: measured 1.8e-7 apart, the last bits only. bf16: every matmul rounds its output to 8 significant
# bits; measured one bf16 step apart (2^-8 = 0.004 at |logit| ~0.6), held to 2.5 steps.
LOGIT_TOLERANCE = {"fp32": {"atol": 1e-5, "rtol": 1e-5}, "bf16": {"atol": 1e-2, "rtol": 0.0}}


def test_packed_logits_equal_padded(tiny_model_dir, precision):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=DTYPES[precision]).eval()
    padded = PadCollator(pad_token_id=0)(rows())
    with torch.no_grad():
        ref = model(**{k: v for k, v in padded.items() if k != "labels"}, use_cache=False).logits
    model.set_attn_implementation(register_packed_attention())
    packed = PackedCollator()(rows())
    with torch.no_grad():
        got = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits
    start = 0
    for i, r in enumerate(rows()):
        n = len(r["input_ids"])
        torch.testing.assert_close(got[0, start : start + n], ref[i, :n], **LOGIT_TOLERANCE[precision])
        start += n
    # the same model with ordinary padded batches (generation, eval) still masks padding
    with torch.no_grad():
        again = model(**{k: v for k, v in padded.items() if k != "labels"}, use_cache=False).logits
    torch.testing.assert_close(again, ref, **LOGIT_TOLERANCE[precision])


# The loss (mean cross-entropy, ~5.6) is taken in fp32 from the logits. fp32: measured 4.8e-7 apart over the
# four steps. bf16: the logits' rounding differs between the layouts (see above) and each update carries it
# on; measured 1.5e-4 apart (2.6e-5 relative), held to 1e-3 relative, a quarter of one bf16 step (2^-8).
# A wrong mask or loss normalisation moves the loss by far more (> 1e-2).
LOSS_TOLERANCE = {"fp32": {"abs": 1e-4}, "bf16": {"rel": 1e-3}}


def test_packed_training_matches_padded_loss(tiny_model_dir, tmp_path, precision):
    import json

    from chattune.config import build_config
    from chattune.train.run import run_training

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"q {i} " * (1 + i % 4)},
        {"role": "assistant", "content": f"a {i} " * (1 + i % 3)}]}) + "\n" for i in range(16)))  # fmt: skip

    def curve(packing):
        out = tmp_path / f"p{packing}"
        cfg = dict(model=str(tiny_model_dir), train_file=str(data), output_dir=str(out), batch_size=4, grad_accum=1,
                   max_steps=4, logging_steps=1, lora_dropout=0.0, packing=packing, learning_rate=1e-2, num_threads=1, precision=precision)  # fmt: skip
        run_training(build_config(cfg))
        assert "chattune_packed" not in (out / "final" / "adapter_config.json").read_text()
        return [
            r["loss"]
            for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    assert curve(True) == pytest.approx(curve(False), **LOSS_TOLERANCE[precision])


# The CUDA path: one FlexAttention call with a document mask. Run eagerly on CPU it must give what the
# per-sample loop gives: fp32 measured 5e-7 apart (sums in another order); bf16 0.0078, one rounding step of
# outputs between 2 and 4, held to 2.5 steps. Attending across samples would move outputs by O(1).
FLEX_TOLERANCE = {"fp32": {"atol": 1e-5, "rtol": 1e-5}, "bf16": {"atol": 2e-2, "rtol": 0.0}}


@pytest.mark.parametrize("groups", [2, 4])  # grouped-query and plain multi-head attention
def test_flex_document_mask_equals_the_per_sample_loop(precision, groups):
    import itertools
    import warnings

    import torch.nn.functional as F

    from chattune.models.attention import document_ids, flex_packed_attention

    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[precision]
    bounds = torch.tensor([0, 7, 19, 20, 45])
    q, k, v = (torch.randn(1, h, 45, 16, generator=g).to(dtype) for h in (4, groups, groups))
    assert document_ids(bounds).tolist() == [0] * 7 + [1] * 12 + [2] + [3] * 25
    with warnings.catch_warnings():  # eager FlexAttention warns that it is meant to be compiled
        warnings.simplefilter("ignore")
        got = flex_packed_attention(q, k, v, bounds, None, groups != 4, compiled=False)
    want = torch.empty_like(q)
    for a, b in itertools.pairwise(bounds.tolist()):
        want[:, :, a:b] = F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=groups != 4
        )
    torch.testing.assert_close(got, want, **FLEX_TOLERANCE[precision])
