"""`chattune export`: fold a LoRA adapter into its base and write a standalone model dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from chattune.errors import ChattuneError, ConfigError, ModelLoadError
from chattune.infer.engine import ADAPTER_FILE, read_run_info

DTYPES = ("auto", "fp32", "bf16", "fp16")


def prefix_tuning_message(adapter: Path, base: str | None) -> str:
    """Why a P-Tuning v2 adapter cannot be merged, and how to serve it instead."""
    model = base or "BASE"
    return (
        f"{adapter} is a P-Tuning v2 (prefix tuning) adapter, which cannot be merged: prefix tuning does not "
        "change any weight of the base model, it adds learnt virtual key/value tokens in front of every "
        "attention layer at run time, and no change of the weights reproduces those extra tokens. Use the "
        f"adapter beside its base instead: `chattune serve --model {model} --adapter {adapter}` for an API, "
        f"`chattune chat --model {model} --adapter {adapter}` to talk to it, or "
        f"`chattune infer --adapter {adapter} --prompt TEXT` for one-off generation. Only LoRA adapters can "
        "be exported as a merged model."
    )


def check_adapter(adapter: Path, base: str | None) -> dict[str, Any]:
    """The adapter's PEFT config, or a clear error when the dir is no LoRA adapter."""
    if not adapter.is_dir():
        raise ModelLoadError(
            f"adapter {adapter} is not a directory (expected a run's final/, best/ or checkpoint-N/)"
        )
    config_file = adapter / ADAPTER_FILE
    if not config_file.is_file():
        if (adapter / "config.json").is_file():
            raise ChattuneError(
                f"{adapter} is already a standalone model (a full or freeze fine-tuning output, no "
                f"{ADAPTER_FILE}), so there is nothing to merge: use it as it is (`--adapter {adapter}` "
                "keeps the run's template; plain transformers loads it with from_pretrained), or copy the "
                "directory"
            )
        raise ModelLoadError(
            f"{adapter} holds neither a PEFT adapter ({ADAPTER_FILE}) nor a model (config.json)"
        )
    peft_config = json.loads(config_file.read_text(encoding="utf-8"))
    peft_type = peft_config.get("peft_type")
    if peft_type == "PREFIX_TUNING":
        raise ChattuneError(prefix_tuning_message(adapter, base))
    if peft_type != "LORA":
        raise ChattuneError(f"{adapter} is a {peft_type} adapter; export merges LoRA adapters only")
    return peft_config


def check_output(output: Path, overwrite: bool, sources: list[Path]) -> None:
    """Refuse to write over a non-empty dir (unless told to) or over the model being read."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {output} exists and is not a directory")
    resolved = output.resolve()
    for source in sources:
        if resolved == source.resolve():
            raise ConfigError(f"output {output} is the directory being merged from; choose another output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(
            f"output {output} is not empty; choose another directory or pass --overwrite to replace it"
        )


def saved_dtype(base_dir: Path) -> str:
    """The precision the base was saved in (config.json), so the merged model keeps the base's size."""
    config_file = base_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name, "fp32")


def export_merged(
    model: str | None,
    adapter: Path,
    output: Path,
    *,
    console: Console,
    overwrite: bool = False,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Path:
    """Merge a LoRA adapter into its base (float32, CPU) and write a standalone model dir; returns it.

    `dtype` is the precision written: auto keeps the base's own (merging itself always runs in float32).
    """
    import torch
    from peft import PeftModel

    from chattune.data.templates import Limits, build_template
    from chattune.models.load import load_model, load_tokenizer, resolve_path
    from chattune.train.trainer import replace_dir

    adapter, output = Path(adapter), Path(output)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    info = read_run_info(adapter)
    base = model or info.get("base_model")
    check_adapter(adapter, base)
    if base is None:
        raise ConfigError(f"--model is required ({adapter} does not record its base model)")
    base_dir = Path(resolve_path(base))
    check_output(output, overwrite, [adapter, base_dir])

    console.print(f"merging {adapter} into {base} (float32, CPU)")
    # the run saved its tokenizer (chat template included) beside the adapter; that is what training used
    tok = load_tokenizer(str(base_dir), str(adapter), trust_remote_code)
    limits = Limits(
        info.get("max_seq_len", 2048), info.get("max_source_len", 1024), info.get("max_target_len", 128)
    )
    template = build_template(info.get("template", "auto"), tok, limits)
    net = load_model(str(base_dir), precision="fp32", trust_remote_code=trust_remote_code)
    # safe_merge checks the merged weights for NaN/inf before they replace the base's
    merged = PeftModel.from_pretrained(net, str(adapter)).merge_and_unload(safe_merge=True)
    target = saved_dtype(base_dir) if dtype == "auto" else dtype
    merged = merged.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[target])
    merged.config.use_cache = True  # load_model turns the cache off for training; generation wants it

    stops = template.stop_token_ids()
    generation = merged.generation_config
    # plain `generate` on the export then stops where chattune's template stops (end of turn, not only eos)
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    generation._from_model_config = False  # deliberate values; older transformers re-derive flagged ones
    if tok.pad_token_id is not None:
        generation.pad_token_id = tok.pad_token_id

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp))  # safetensors (the only format transformers 5 writes)
        tok.save_pretrained(str(tmp))
        record = info | {
            "merged_from": {"base_model": base, "adapter": str(adapter.resolve()), "dtype": target}
        }
        (tmp / "chattune.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(
        f"[bold green]Exported[/] a standalone {target} model → {output} (template {template.name})"
    )
    return output
