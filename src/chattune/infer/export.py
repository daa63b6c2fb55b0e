"""`chattune export`: fold a LoRA adapter into its base and write a standalone model: a transformers dir, a
GGUF, or a GGUF with an Ollama Modelfile."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from chattune.atomic import atomic_dir
from chattune.compat.transformers import keep_generation_config
from chattune.errors import ChattuneError, ConfigError, ModelLoadError
from chattune.rundir import ADAPTER_CONFIG, RunInfo, read_run_info

DTYPES = ("auto", "fp32", "bf16", "fp16")
FORMATS = ("hf", "gguf", "ollama")


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


def check_adapter(adapter: Path, base: str | None, allow_full: bool = False) -> dict[str, Any] | None:
    """The adapter's PEFT config, or a clear error when the dir is no LoRA adapter.

    `allow_full`: a full/freeze output (a standalone model dir) is accepted as it is (None is returned).
    """
    if not adapter.is_dir():
        raise ModelLoadError(
            f"adapter {adapter} is not a directory (expected a run's final/, best/ or checkpoint-N/)"
        )
    config_file = adapter / ADAPTER_CONFIG
    if not config_file.is_file():
        if (adapter / "config.json").is_file() and allow_full:
            return None
        if (adapter / "config.json").is_file():
            raise ChattuneError(
                f"{adapter} is already a standalone model (a full or freeze fine-tuning output, no "
                f"{ADAPTER_CONFIG}), so there is nothing to merge: use it as it is (`--adapter {adapter}` "
                "keeps the run's template; plain transformers loads it with from_pretrained), or copy the "
                "directory"
            )
        raise ModelLoadError(
            f"{adapter} holds neither a PEFT adapter ({ADAPTER_CONFIG}) nor a model (config.json)"
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


@dataclass
class Source:
    """What an export reads: the run's record, the model dir weights come from, and the adapter (if LoRA)."""

    info: RunInfo
    base: str
    model_dir: Path
    adapter: Path
    is_lora: bool


def resolve_source(
    model: str | None, adapter: Path, output: Path, overwrite: bool, allow_full: bool
) -> Source:
    """Check adapter and output before any work; a full/freeze output is its own model when `allow_full`."""
    from chattune.models.load import resolve_path

    info = read_run_info(adapter)
    base = model or info.base_model
    is_lora = check_adapter(adapter, base, allow_full) is not None
    if not is_lora:
        base = str(adapter)
    if base is None:
        raise ConfigError(f"--model is required ({adapter} does not record its base model)")
    model_dir = Path(resolve_path(base))
    check_output(output, overwrite, [adapter, model_dir])
    return Source(info, base, model_dir, adapter, is_lora)


def load_tuned(source: Source, console: Console, trust_remote_code: bool) -> tuple[Any, Any, Any]:
    """(model in float32 on the CPU with any LoRA merged, tokenizer, template) exactly as the run trained."""
    from peft import PeftModel

    from chattune.data.templates import build_template
    from chattune.models.load import load_model, load_tokenizer

    # the run saved its tokenizer (chat template included) beside the adapter; that is what training used
    tok = load_tokenizer(str(source.model_dir), str(source.adapter), trust_remote_code)
    template = build_template(source.info.template, tok, source.info.limits)
    net = load_model(str(source.model_dir), precision="fp32", trust_remote_code=trust_remote_code)
    if source.is_lora:
        console.print(f"merging {source.adapter} into {source.base} (float32, CPU)")
        # safe_merge checks the merged weights for NaN/inf before they replace the base's
        net = PeftModel.from_pretrained(net, str(source.adapter)).merge_and_unload(safe_merge=True)
    net.config.use_cache = True  # load_model turns the cache off for training; generation wants it
    return net.eval(), tok, template


def _record(source: Source, **extra: Any) -> RunInfo:
    """The run record of an export: the run's own plus where the weights came from."""
    if source.is_lora:
        origin = {"base_model": source.base, "adapter": str(source.adapter.resolve())}
    else:
        origin = {"model": str(source.adapter.resolve())}
    key = "merged_from" if source.is_lora else "exported_from"
    return source.info.with_extra(**{key: origin | extra})


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

    adapter, output = Path(adapter), Path(output)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    source = resolve_source(model, adapter, output, overwrite, allow_full=False)
    merged, tok, template = load_tuned(source, console, trust_remote_code)
    target = saved_dtype(source.model_dir) if dtype == "auto" else dtype
    merged = merged.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[target])

    stops = template.stop_token_ids()
    generation = merged.generation_config
    # plain `generate` on the export then stops where chattune's template stops (end of turn, not only eos)
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    keep_generation_config(generation)  # deliberate values; transformers re-derives flagged ones
    if tok.pad_token_id is not None:
        generation.pad_token_id = tok.pad_token_id

    with atomic_dir(output) as tmp:
        merged.save_pretrained(str(tmp))  # safetensors (the only format transformers 5 writes)
        tok.save_pretrained(str(tmp))
        _record(source, dtype=target).write(tmp)
    console.print(
        f"[bold green]Exported[/] a standalone {target} model → {output} (template {template.name})"
    )
    return output


def export_gguf(
    model: str | None,
    adapter: Path,
    output: Path,
    *,
    console: Console,
    fmt: str = "gguf",
    gguf_type: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write the merged model (a LoRA merged; a full/freeze output as it is) as a GGUF in the dir `output`,
    with the run's tokenizer, stop tokens and chat template; `fmt` ollama adds a Modelfile. Returns the GGUF.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from chattune.infer import gguf_export, gguf_vocab, ollama
    from chattune.infer.generate import Sampling

    adapter, output = Path(adapter), Path(output)
    if fmt not in ("gguf", "ollama"):
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    choices = ("auto", *gguf_export.GGUF_TYPES)
    if gguf_type not in choices:
        raise ConfigError(f"--gguf-type must be one of {', '.join(choices)}, not {gguf_type!r}")
    source = resolve_source(model, adapter, output, overwrite, allow_full=True)
    config_file = source.model_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    arch = gguf_export.check_architecture(config, source.model_dir)  # before the (slow) load and merge
    target = (
        gguf_type
        if gguf_type != "auto"
        else {"bf16": "bf16", "fp32": "f32"}.get(saved_dtype(source.model_dir), "f16")
    )

    net, tok, template = load_tuned(source, console, trust_remote_code)
    gguf_vocab.tokenizer_kind(tok)  # an unsupported tokenizer fails before anything is written
    name = f"model-{target}.gguf"
    stop_ids = template.stop_token_ids()
    family = None
    chat_template = gguf_vocab.chat_template_for(template)
    if fmt == "ollama" and chat_template:
        stops = [tok.convert_ids_to_tokens(i) for i in stop_ids]

        def render_jinja(messages: list[dict[str, str]], prompt: bool) -> str:
            return tok.apply_chat_template(
                messages, chat_template=chat_template, tokenize=False, add_generation_prompt=prompt
            )

        family = ollama.find_family(render_jinja, stops)

    with atomic_dir(output) as tmp:
        tok.save_pretrained(str(tmp / "tokenizer"))  # what gguf.SpecialVocab reads the merges from
        metadata = gguf_vocab.tokenizer_metadata(
            tok, template, tmp / "tokenizer", net.config.vocab_size, config.get("model_type", "")
        )
        total = sum(p.numel() * p.element_size() for p in net.state_dict().values())
        columns = ("{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"writing {name}", total=total)
            gguf_export.write_gguf(tmp / name, net, arch, target, metadata, lambda n: bar.advance(task, n))
        shutil.rmtree(tmp / "tokenizer")
        if fmt == "ollama":
            stops = [tok.convert_ids_to_tokens(i) for i in stop_ids]
            text = ollama.modelfile(name, family and family[0], family and family[1], stops, Sampling())
            (tmp / "Modelfile").write_text(text, encoding="utf-8")
        _record(source, format=fmt, gguf_type=target).write(tmp)
    console.print(
        f"[bold green]Exported[/] {arch} {target} GGUF → {output / name} (template {template.name})"
    )
    if fmt == "ollama":
        if family is None:
            console.print(
                f"[yellow]The Modelfile has no TEMPLATE:[/] template {template.name} is not one chattune writes "
                "in Ollama's template language (ChatML, Llama 3, ChatGLM3); add one before `ollama create`"
            )
        console.print(f"run it with: ollama create NAME -f {output / 'Modelfile'} && ollama run NAME")
    return output / name
