"""The trained-positions loss equals the stock causal-LM loss, gradients included."""

from __future__ import annotations

import torch
from tests.conftest import DTYPES, relative_error

from chattune.train.loss import split_backbone_and_head, trained_positions_loss

# (loss tolerance for assert_close, bound on each gradient's relative error). Ours gathers the trained
# positions and drops the padding mask (SDPA's causal kernel); the stock path keeps the mask and the full
# logits. The loss comes out of the same bf16 logits either way, summed in fp32: equal to 1e-7 in both
# precisions. The gradients go back through two attention kernels: fp32 measured 1e-6 apart; in bf16 each
# kernel rounds its intermediates to 8 significant bits in its own order, measured 1.5e-2 at most
# (a LoRA A matrix), held to 4e-2. A gradient missing a term is off by O(1).
STOCK_TOLERANCE = {"fp32": ({"atol": 1e-5, "rtol": 1e-5}, 1e-4), "bf16": ({"atol": 0, "rtol": 1e-5}, 4e-2)}


def test_matches_stock_loss_and_gradients(tiny_model_dir, precision):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=DTYPES[precision]),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    ids = torch.randint(5, 300, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    stock = model(**inputs).loss
    stock.backward()
    stock_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    split = split_backbone_and_head(model)
    assert split is not None
    ours = trained_positions_loss(*split, inputs, None)
    ours.backward()
    loss_tolerance, grad_tolerance = STOCK_TOLERANCE[precision]
    torch.testing.assert_close(ours, stock, **loss_tolerance)
    errors = {
        n: relative_error(p.grad, stock_grads[n]) for n, p in model.named_parameters() if p.requires_grad
    }
    assert max(errors.values()) < grad_tolerance, sorted(errors.items(), key=lambda e: -e[1])[:3]


def test_prefix_tuning_keeps_stock_path(tiny_model_dir):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    )
    assert split_backbone_and_head(model) is None


# (loss tolerance for assert_close, bound on each gradient's relative error). Chunking the head changes only
# which rows go through one matmul, and every logit is a dot product over the same 16 numbers: gradients
# measured 7e-8 apart in fp32 and bit-equal in bf16; held to 1e-6 and a quarter of a bf16 step.
CHUNK_TOLERANCE = {"fp32": ({}, 1e-6), "bf16": ({"atol": 0, "rtol": 1e-5}, 1e-3)}


def test_chunked_head_matches_full_logits_for_hidden_and_weight_gradients(monkeypatch, precision):
    from chattune.train import loss as loss_module

    monkeypatch.setattr(loss_module, "HEAD_CHUNK", 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False, dtype=DTYPES[precision])
    hidden = torch.randn(23, 16, dtype=DTYPES[precision], requires_grad=True)
    targets = torch.randint(0, 50, (23,))

    ours = loss_module.head_cross_entropy(head, hidden, targets)
    (ours * 0.5).backward()
    ours_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    # the stock path as transformers takes it: full logits in the model's dtype, cross-entropy in fp32
    stock = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (stock * 0.5).backward()

    loss_tolerance, grad_tolerance = CHUNK_TOLERANCE[precision]
    torch.testing.assert_close(ours, stock, **loss_tolerance)
    assert ours_grads[0].dtype == hidden.grad.dtype and ours_grads[1].dtype == head.weight.grad.dtype
    assert relative_error(ours_grads[0], hidden.grad) < grad_tolerance
    assert relative_error(ours_grads[1], head.weight.grad) < grad_tolerance
    with torch.no_grad():  # evaluation takes the gradient-free path, same value
        torch.testing.assert_close(
            loss_module.head_cross_entropy(head, hidden, targets), stock, **loss_tolerance
        )


# (loss tolerance for assert_close, bound on each gradient's relative error). Without the mask SDPA takes
# its causal kernel, with it a dense masked one. Loss: measured 8e-8 apart in bf16 (fp32 sums of the same
# logits). Gradients (full fine-tuning, every weight): fp32 measured 6e-7; bf16 8.7e-3 at most, each kernel's
# backward rounding in its own order, held to 3e-2. Attending to a pad would move them by O(1).
MASK_TOLERANCE = {"fp32": ({"atol": 1e-5, "rtol": 1e-5}, 1e-4), "bf16": ({"atol": 0, "rtol": 1e-5}, 3e-2)}


def test_right_padded_batches_drop_the_mask_and_keep_loss_and_gradients(tiny_model_dir, precision):
    from transformers import AutoModelForCausalLM

    from chattune.train.loss import causal_suffices

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=DTYPES[precision])
    backbone, head = split_backbone_and_head(model)
    ids = torch.randint(5, 300, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    assert causal_suffices(backbone, mask)
    left = mask.flip(1)
    assert not causal_suffices(backbone, left)  # real tokens after pads would attend to them
    assert not causal_suffices(backbone, torch.zeros_like(mask))

    seen = []
    backbone.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True
    )
    dropped = trained_positions_loss(
        backbone, head, {"input_ids": ids, "attention_mask": mask, "labels": labels}, None
    )
    dropped.backward()
    assert seen[-1] is None
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # the same computation with the mask in force (an implementation that keeps it)
    model.config._attn_implementation = "flash_attention_2"
    assert not causal_suffices(backbone, mask)
    model.config._attn_implementation = "sdpa"
    hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    keep = labels[:, 1:] != -100
    masked = torch.nn.functional.cross_entropy(
        head(hidden[:, :-1][keep]).float(), labels[:, 1:][keep], reduction="sum"
    )
    masked = masked / keep.sum()
    masked.backward()
    loss_tolerance, grad_tolerance = MASK_TOLERANCE[precision]
    torch.testing.assert_close(dropped, masked, **loss_tolerance)
    errors = {n: relative_error(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None}
    assert max(errors.values()) < grad_tolerance, sorted(errors.items(), key=lambda e: -e[1])[:3]
