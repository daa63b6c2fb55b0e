"""The run config: one pydantic model, loaded from YAML plus `key=value` overrides, validated before anything heavy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from chattune.errors import ConfigError
from chattune.registry import did_you_mean


class TrainConfig(BaseModel):
    """Everything a run needs. Field names are a public contract (design.md); descriptions feed the docs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    model: str = Field("smollm2-135m-instruct", description="default-model alias, local model dir, or hub id")
    tokenizer: str | None = Field(None, description="tokenizer dir when it differs from the model's")
    trust_remote_code: bool = Field(False, description="run code shipped with the model (off unless asked)")
    template: Literal["auto", "chatglm3", "hf", "raw"] = Field(
        "auto", description="how samples become tokens"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16/fp16 on GPU, fp32 on CPUs without fast bf16"
    )
    quantization_bit: Literal[4, 8] | None = Field(None, description="load the base in 4/8 bits (CUDA only)")

    # data
    train_file: str | None = Field(None, description=".json array or .jsonl training data")
    eval_file: str | None = Field(None, description="held-out data for eval loss and best/")
    test_file: str | None = Field(None, description="data for `chattune eval`")
    format: Literal[
        "auto", "conversations", "prompt_response", "context_target", "alpaca", "sharegpt", "openai"
    ] = Field("auto", description="data format; auto detects it from the fields")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="stop at a bad record, or skip and count"
    )
    max_seq_len: int = Field(2048, gt=0, description="token limit for conversations")
    max_source_len: int = Field(
        1024, gt=0, description="token limit for a prompt/context (prefix tokens included)"
    )
    max_target_len: int = Field(128, gt=0, description="token limit for a response/target")
    packing: bool = Field(False, description="concatenate samples into rows without padding")
    group_by_length: bool = Field(True, description="batch samples of similar length together (less padding)")

    # method
    method: Literal["lora", "ptuning_v2", "full", "freeze"] = Field("lora", description="what is trained")
    lora_rank: int = Field(8, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    lora_target: str | list[str] = Field("all-linear", description="'all-linear' or a list of module names")
    pre_seq_len: int = Field(128, gt=0, description="P-Tuning v2 virtual tokens per layer")
    prefix_projection: bool = Field(False, description="P-Tuning v2: reparameterise the prefix with an MLP")
    freeze_trainable_layers: int = Field(2, gt=0, description="freeze: how many last blocks are trained")

    # optimisation
    batch_size: int = Field(1, gt=0, description="micro-batch per device")
    grad_accum: int = Field(16, gt=0, description="micro-batches per optimizer step")
    learning_rate: float = Field(2.0e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    gradient_checkpointing: bool = Field(False, description="trade speed for activation memory")
    seed: int = 42
    num_threads: int | None = Field(
        None, gt=0, description="CPU threads; default: the cores this process may use"
    )

    # logging, checkpoints
    output_dir: str = "runs/my-run"
    overwrite_output_dir: bool = Field(False, description="start afresh in a non-empty output_dir")
    resume: bool | str = Field("auto", description="auto | false | path to a checkpoint")
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="defaults to save_steps when eval_file is set")
    save_total_limit: int | None = Field(3, gt=0)
    eval_generate_samples: int = Field(
        50,
        ge=0,
        description="at each eval, generate for up to this many eval samples and score them (0: off)",
    )
    metrics: str | list[str] = Field(
        "auto", description="eval metric families: auto, or text/extraction/tool"
    )
    best_metric: str = Field(
        "loss", description="what best/ follows: loss (lowest), or e.g. rouge-l, f1 (highest)"
    )
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    deepspeed: str | None = Field(None, description="zero2 | zero3 | path to a DeepSpeed JSON")

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        problems = []
        if self.quantization_bit is not None and self.method in ("full", "freeze"):
            problems.append(
                f"quantization_bit: {self.quantization_bit} cannot be combined with method: {self.method} "
                "(quantized weights cannot be trained directly; use method: lora for QLoRA)"
            )
        if self.packing and self.method == "ptuning_v2":
            problems.append(
                "packing cannot be combined with method: ptuning_v2 (the prefix would be shared across the "
                "samples packed into one row); set packing: false"
            )
        if isinstance(self.resume, str) and self.resume != "auto" and not self.resume.strip():
            problems.append("resume must be auto, false or a checkpoint path")
        if self.resume is True:
            self.resume = "auto"
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def require(self, *keys: str) -> None:
        """Fail clearly when a command needs keys the config leaves empty."""
        missing = [k for k in keys if getattr(self, k) in (None, "")]
        if missing:
            raise ConfigError(f"the config must set {', '.join(missing)} for this command")


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` with the value typed like YAML (numbers, bools, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _explain(error: ValidationError, source: str) -> str:
    known = list(TrainConfig.model_fields)
    parts = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'.{did_you_mean(key, known)}")
        elif e["type"] == "literal_error":
            choices = re.findall(r"'([^']*)'|(\d+)", e["ctx"]["expected"])
            names = [a or b for a, b in choices]
            hint = did_you_mean(str(e.get("input")), names)
            parts.append(
                f"'{key}' must be one of {', '.join(names)}, not {e.get('input')!r}.{hint}".rstrip(".")
            )
        elif e["type"] == "value_error":
            parts.append(e["msg"].removeprefix("Value error, "))
        else:
            parts.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return f"Invalid config {source}: " + "; ".join(parts) + "."


def build_config(values: dict[str, Any], source: str = "") -> TrainConfig:
    """Validate a mapping of config values into a TrainConfig, or raise one clear ConfigError."""
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise ConfigError(_explain(e, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then `key=value` overrides."""
    values: dict[str, Any] = {}
    source = "(command line)"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must be a mapping of key: value, not {type(loaded).__name__}"
            )
        values.update({str(k): v for k, v in loaded.items()})
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
    return build_config(values, source)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what infer/serve/eval read back)."""
    Path(path).write_text(
        yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
