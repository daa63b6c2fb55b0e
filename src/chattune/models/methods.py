"""Training methods (one registry): what part of the model learns."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chattune.errors import ConfigError
from chattune.registry import Registry

if TYPE_CHECKING:
    from torch.nn import Module

    from chattune.config import TrainConfig

Method = Callable[[Any, "TrainConfig"], Any]
METHODS: Registry[Method] = Registry("method", ConfigError)

_LAYER = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


@METHODS.register("lora")
def lora(model: Module, cfg: TrainConfig) -> Any:
    """Low-rank adapters on the chosen linear layers (all of them by default)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization_bit is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing is True
        )
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target,
    )
    return get_peft_model(model, config)


@METHODS.register("ptuning_v2")
def ptuning_v2(model: Module, cfg: TrainConfig) -> Any:
    """P-Tuning v2: `pre_seq_len` trained virtual tokens in every layer's keys and values (peft prefix tuning)."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.pre_seq_len,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=model.config.hidden_size,
    )
    return get_peft_model(model, config)


@METHODS.register("full")
def full(model: Module, cfg: TrainConfig) -> Any:
    """Every weight learns."""
    model.requires_grad_(True)
    return model


@METHODS.register("freeze")
def freeze(model: Module, cfg: TrainConfig) -> Any:
    """Only the last `freeze_trainable_layers` transformer blocks learn."""
    layer_of = {name: int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.search(name))}
    if not layer_of:
        raise ConfigError(f"method: freeze cannot find the transformer blocks of {type(model).__name__}")
    n_layers = max(layer_of.values()) + 1
    first = max(n_layers - cfg.freeze_trainable_layers, 0)
    for name, p in model.named_parameters():
        p.requires_grad_(layer_of.get(name, -1) >= first)
    return model


def parameter_counts(model: Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def describe_trainable(model: Module) -> str:
    """The line peft prints: `trainable params: X || all params: Y || trainable%: Z`."""
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def apply_method(model: Module, cfg: TrainConfig) -> Any:
    """The model with the config's method applied (adapters added, or weights frozen)."""
    return METHODS.get(cfg.method)(model, cfg)
