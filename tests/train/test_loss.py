"""The trained-positions loss equals the stock causal-LM loss, gradients included."""

from __future__ import annotations

import torch

from chattune.train.loss import split_backbone_and_head, trained_positions_loss


def test_matches_stock_loss_and_gradients(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
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
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, stock_grads[n], atol=1e-5, rtol=1e-4)


def test_prefix_tuning_keeps_stock_path(tiny_model_dir):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    )
    assert split_backbone_and_head(model) is None


def test_chunked_head_matches_full_logits_for_hidden_and_weight_gradients(monkeypatch):
    from chattune.train import loss as loss_module

    monkeypatch.setattr(loss_module, "HEAD_CHUNK", 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))

    ours = loss_module.head_cross_entropy(head, hidden, targets)
    (ours * 0.5).backward()
    ours_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    stock = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (stock * 0.5).backward()

    torch.testing.assert_close(ours, stock)
    torch.testing.assert_close(ours_grads[0], hidden.grad)
    torch.testing.assert_close(ours_grads[1], head.weight.grad)
    with torch.no_grad():  # evaluation takes the gradient-free path, same value
        torch.testing.assert_close(loss_module.head_cross_entropy(head, hidden, targets), stock)


def test_right_padded_batches_drop_the_mask_and_keep_loss_and_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from chattune.train.loss import causal_suffices

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
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
        head(hidden[:, :-1][keep]), labels[:, 1:][keep], reduction="sum"
    )
    masked = masked / keep.sum()
    masked.backward()
    torch.testing.assert_close(dropped, masked, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)
