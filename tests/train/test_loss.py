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
