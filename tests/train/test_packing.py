"""Packed rows (no padding, attention kept within each sample) give the same logits and loss as padded batches."""

from __future__ import annotations

import torch

from chattune.data.batching import PackedCollator, PadCollator
from chattune.models.attention import register_packed_attention


def rows():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (7, 12, 4):
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def test_packed_logits_equal_padded(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
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
        torch.testing.assert_close(got[0, start : start + n], ref[i, :n], atol=1e-5, rtol=1e-5)
        start += n
    # the same model with ordinary padded batches (generation, eval) still masks padding
    with torch.no_grad():
        again = model(**{k: v for k, v in padded.items() if k != "labels"}, use_cache=False).logits
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)


def test_packed_training_matches_padded_loss(tiny_model_dir, tmp_path):
    import json

    from chattune.config import build_config
    from chattune.train.run import run_training

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"q {i} " * (1 + i % 4)},
        {"role": "assistant", "content": f"a {i} " * (1 + i % 3)}]}) + "\n" for i in range(16)))  # fmt: skip

    def curve(packing):
        out = tmp_path / f"p{packing}"
        cfg = dict(model=str(tiny_model_dir), train_file=str(data), output_dir=str(out), batch_size=4, grad_accum=1,
                   max_steps=4, logging_steps=1, lora_dropout=0.0, packing=packing, learning_rate=1e-2, num_threads=1)  # fmt: skip
        run_training(build_config(cfg))
        assert "chattune_packed" not in (out / "final" / "adapter_config.json").read_text()
        return [
            r["loss"]
            for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    assert curve(True) == __import__("pytest").approx(curve(False), abs=1e-4)
