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
