"""The run config: one pydantic model, loaded from YAML plus `key=value` overrides, validated before anything heavy."""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chattune.data.formats import FORMATS
from chattune.data.templates import TEMPLATES
from chattune.errors import ConfigError
from chattune.limits import Limits
from chattune.models.methods import METHODS
from chattune.registry import did_you_mean

# config field -> the names it accepts, read from the registry that owns them
REGISTERED = {
    "template": lambda: ["auto", *TEMPLATES.names()],
    "format": lambda: ["auto", *FORMATS.names()],
    "method": METHODS.names,
}


class TrainConfig(BaseModel):
    """Everything a run needs. Field names are a public contract (configs in the wild use them; the README's
    tables list them); descriptions feed `--help`-style docs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    model: str = Field("smollm2-135m-instruct", description="default-model alias, local model dir, or hub id")
    tokenizer: str | None = Field(None, description="tokenizer dir when it differs from the model's")
    trust_remote_code: bool = Field(False, description="run code shipped with the model (off unless asked)")
    template: str = Field("auto", description="how samples become tokens: auto, or a registered template")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16/fp16 on GPU, fp32 on CPUs without fast bf16"
    )
    quantization_bit: Literal[4, 8] | None = Field(None, description="load the base in 4/8 bits (CUDA only)")
    pure_bf16: bool = Field(
        False,
        description="full/freeze in bf16: keep the trained weights in bf16 too (half the weight, gradient and "
        "optimizer memory, but updates below bf16's resolution are lost); default: fp32 master weights under "
        "bf16 autocast (bench/README.md, 'Full and freeze in bf16')",
    )

    # data
    train_file: str | None = Field(None, description=".json array or .jsonl training data")
    eval_file: str | None = Field(None, description="held-out data for eval loss and best/")
    test_file: str | None = Field(None, description="data for `chattune eval`")
    format: str = Field(
        "auto", description="data format: auto detects it from the fields, or a registered format"
    )
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="stop at a bad record, or skip and count"
    )
    train_reasoning: bool = Field(
        True, description="learn assistant turns' reasoning traces; false: only the answers are learnt"
    )
    strict_fields: bool = Field(
        False, description="a message field the format does not read is an error (default: a warning)"
    )
    max_seq_len: int = Field(Limits.max_seq_len, gt=0, description="token limit for conversations")
    max_source_len: int = Field(
        Limits.max_source_len, gt=0, description="token limit for a prompt/context (prefix tokens included)"
    )
    max_target_len: int = Field(Limits.max_target_len, gt=0, description="token limit for a response/target")
    packing: bool = Field(False, description="concatenate samples into rows without padding")
    group_by_length: bool = Field(True, description="batch samples of similar length together (less padding)")

    # method
    method: str = Field(
        "lora", description="what is trained: a registered method (lora, ptuning_v2, full, freeze)"
    )
    lora_rank: int = Field(8, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="dropout on the adapters' input; the fused LoRA functions (fuse_lora) draw it in steps of "
        "1/256 (0.1 runs as 26/256 = 0.1016, 0.05 as 13/256 = 0.0508, at most 1/512 as none)",
    )
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
    gradient_checkpointing: bool | Literal["mlp"] = Field(
        False,
        description="trade speed for activation memory: true recomputes whole layers in backward, "
        "mlp only the MLP blocks (most of the memory for about half the extra time)",
    )
    fuse_lora: bool = Field(
        True,
        description="LoRA layers as fused autograd functions, same gradients: each SwiGLU MLP block (Llama, "
        "Qwen, Mistral...) as one, saving about a quarter of the activation memory, and every other LoRA "
        "projection as one (faster), and on a CPU the frozen RMSNorms with a hand-written backward (faster); "
        "false keeps peft's and transformers' modules",
    )
    seed: int = 42
    num_threads: int | None = Field(
        None, gt=0, description="CPU threads; default: the cores this process may use"
    )
    allocator: Literal["auto", "tcmalloc", "jemalloc", "system"] = Field(
        "auto",
        description="malloc for `chattune train` on Linux: auto = tcmalloc, else jemalloc, when installed",
    )

    # logging, checkpoints
    output_dir: str = "runs/my-run"
    overwrite_output_dir: bool = Field(False, description="start afresh in a non-empty output_dir")
    resume: bool | str = Field("auto", description="auto | false | path to a checkpoint")
    # training faults (issue 8): a NaN/inf loss stops the run unless a few such steps may be skipped
    skip_nan_steps: int = Field(
        0, ge=0, description="skip up to this many steps with a NaN/inf loss (not applied) before stopping"
    )
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

    @field_validator("template", "format", "method")
    @classmethod
    def _registered(cls, value: str, info: Any) -> str:
        # the registries are the one list of names: a new template, format or method is valid here at once
        known = REGISTERED[info.field_name]()
        if value not in known:
            hint = did_you_mean(value, known) if isinstance(value, str) else ""
            raise ValueError(f"'{info.field_name}' must be one of {', '.join(known)}, not {value!r}.{hint}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        # pydantic reads true as 1, so `epochs: yes` or `lora_rank: on` would silently become 1
        if isinstance(value, bool) and info.field_name in _NUMERIC_FIELDS:
            raise ValueError(f"'{info.field_name}' must be a number, not {str(value).lower()}")
        return value

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
            problems.append("'resume' must be auto, false or a checkpoint path")
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


_NUMERIC_FIELDS = {
    name
    for name, f in TrainConfig.model_fields.items()
    if str(f.annotation) in ("<class 'int'>", "<class 'float'>", "int | None", "float | None")
}
# A wrong value quoted in a message stays short, even a 1 MB string or a YAML alias bomb of nested lists.
_MAX_PROBLEMS = 8
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel, _repr.maxlist = 60, 60, 2, 4


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


def _explain(error: ValidationError, source: str, lines: dict[str, int], given: dict[str, Any]) -> str:
    known = list(TrainConfig.model_fields)
    parts: list[str] = []
    by_key: dict[str, tuple[int, list[str]]] = {}
    for e in error.errors(include_url=False):
        key = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        at = f"line {lines[e['loc'][0]]}: " if e["loc"] and e["loc"][0] in lines else ""
        if e["type"] == "extra_forbidden":
            # repr: a key may hold quotes or newlines, and the message stays one line
            parts.append(f"{at}unknown key {_repr.repr(key)}.{did_you_mean(key, known)}")
        elif e["type"] == "literal_error":
            choices = re.findall(r"'([^']*)'|(\d+)", e["ctx"]["expected"])
            names = [a or b for a, b in choices]
            hint = did_you_mean(value, names) if isinstance(value, str) else ""
            parts.append(f"{at}'{key}' must be one of {', '.join(names)}, not {_repr.repr(value)}.{hint}")
        elif e["type"] == "value_error":
            parts.append(at + e["msg"].removeprefix("Value error, "))
        else:
            # Union fields (`resume: bool | str`, `lora_target: str | list[str]`) fail once per branch, at
            # locations like 'resume.bool': name the key the user wrote, once, with every accepted kind.
            top = str(e["loc"][0]) if e["loc"] else "config"
            if top in by_key:
                i, msgs = by_key[top]
                if e["msg"] not in msgs:
                    msgs.append(e["msg"])
                    kinds = " or ".join([msgs[0]] + [m.removeprefix("Input should be ") for m in msgs[1:]])
                    parts[i] = f"{at}'{top}': {kinds} (got {_repr.repr(given.get(top, value))})"
                continue
            by_key[top] = (len(parts), [e["msg"]])
            parts.append(f"{at}'{top}': {e['msg']} (got {_repr.repr(given.get(top, value))})")
    if len(parts) > _MAX_PROBLEMS:  # a wrong file (not a config at all) must not flood the terminal
        parts[_MAX_PROBLEMS:] = [f"and {len(parts) - _MAX_PROBLEMS} more problems"]
    # each part may end in '.' or '?' already (hints); join into one sentence-terminated paragraph
    text = "; ".join(p.rstrip(".") for p in parts)
    return f"Invalid config {source}: {text}" + ("" if text.endswith("?") else ".")


def build_config(
    values: dict[str, Any], source: str = "", lines: dict[str, int] | None = None
) -> TrainConfig:
    """Validate a mapping of config values into a TrainConfig, or raise one clear ConfigError.

    `lines` maps keys to the line of `source` that set them, so messages can point there.
    """
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise ConfigError(_explain(e, source, lines or {}, values)) from None
    except RecursionError:  # pydantic walking a value nested thousands of levels deep
        raise ConfigError(f"Invalid config {source}: a value is nested too deeply.") from None


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """A YAML error as one line: the line it is on, then what is wrong."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f"at line {mark.line + 1}: {getattr(e, 'problem', None) or e}"
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML forbids (NUL, other control codes)
        line = text.count("\n", 0, e.position) + 1
        return f"at line {line}: {e.reason} (character #x{e.character:04x})"
    return ": " + " ".join(str(e).split())


def _key_lines(text: str, path: Path) -> dict[str, int]:
    """Line of each top-level key; raise a ConfigError for a key written twice (YAML keeps the last, silently)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(
                    f"config file {path}: key '{key}' is set twice (lines {lines[key]} and {line}); keep one"
                )
            lines[key] = line
    return lines


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then `key=value` overrides."""
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "(command line)"
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; expected a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        text = ""
        try:
            text = path.read_text(encoding="utf-8-sig")
            loaded = yaml.safe_load(text)
            lines = _key_lines(text, path)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML {_yaml_problem(e, text)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (undecodable byte at offset {e.start}); save it as UTF-8"
            ) from None
        except RecursionError:
            raise ConfigError(f"config file {path} is nested too deeply to be a config") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
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
        lines.pop(key, None)  # the command line set it, not that line of the file
    return build_config(values, source, lines)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what infer/serve/eval read back)."""
    Path(path).write_text(
        yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
