"""The `chattune` command: parses arguments and dispatches; the work lives in the modules it calls."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from chattune.errors import ChattuneError, ConfigError

app = typer.Typer(help="Fine-tune chat LLMs on your own data, and put the result to work.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode=None)  # fmt: skip
data_app = typer.Typer(help="Check and convert training data.", no_args_is_help=True)
model_app = typer.Typer(help="Default models: pull, list, convert.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

PROGRAM = object()  # main() passes this as the context object: the process is the `chattune` program itself

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides of config keys")]


@app.command()
def train(ctx: typer.Context, config: ConfigArg, overrides: Overrides = None) -> None:
    """Fine-tune a model: `chattune train CONFIG.yaml [key=value ...]`."""
    from chattune.config import load_config
    from chattune.system import use_allocator

    cfg = load_config(config, overrides or [])
    if ctx.obj is PROGRAM:  # never exec over a caller that imported the app (tests, notebooks)
        use_allocator(cfg.allocator)
    from chattune.train.run import run_training

    run_training(cfg, console=err)


ModelOpt = Annotated[
    str | None, typer.Option("--model", help="alias, local dir or hub id (default: the run's base)")
]
AdapterOpt = Annotated[
    str | None,
    typer.Option("--adapter", "--pt-checkpoint", help="a LoRA or P-Tuning v2 output dir (final/, best/...)"),
]

TokenizerOpt = Annotated[str | None, typer.Option("--tokenizer", help="tokenizer dir, when not the model's")]
TemplateOpt = Annotated[str | None, typer.Option(help="override the run's template")]
TopPOpt = Annotated[float, typer.Option("--top-p")]
DoSampleOpt = Annotated[bool, typer.Option("--do-sample/--greedy")]
PreSeqLenOpt = Annotated[int | None, typer.Option("--pt-pre-seq-len", help="check the P-Tuning v2 prefix")]


@app.command()
def infer(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    template: TemplateOpt = None,
    mode: Annotated[
        str, typer.Option(help="generate: encode as training did; chat: as a user turn")
    ] = "generate",
    prompt: Annotated[str | None, typer.Option(help="one prompt; the reply is printed")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", help="a data file of prompts")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="predictions .jsonl")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt (chat mode)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    temperature: float = 0.7,
    top_p: TopPOpt = 0.9,
    do_sample: DoSampleOpt = False,
    seed: int | None = None,
    pre_seq_len: PreSeqLenOpt = None,
    compare_base: Annotated[
        bool, typer.Option(help="also run the base model and print both side by side")
    ] = False,
) -> None:
    """Generate with a (tuned) model: one --prompt, or a whole --input file."""
    from chattune.infer.generate import Sampling
    from chattune.infer.run import run_infer

    run_infer(
        model=model,
        adapter=adapter,
        tokenizer=tokenizer,
        template=template,
        mode=mode,
        prompt=prompt,
        input_file=input_file,
        output=output,
        system=system,
        sampling=Sampling(max_new_tokens, temperature, top_p, do_sample, seed),
        batch_size=batch_size,
        compare_base=compare_base,
        pre_seq_len=pre_seq_len,
        out=out,
        err=err,
    )


@app.command("eval")
def evaluate(
    config: Annotated[
        Path | None, typer.Argument(help="a run's YAML config (evaluates output_dir/final)")
    ] = None,
    overrides: Overrides = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    data: Annotated[Path | None, typer.Option("--data", help="data file with reference answers")] = None,
    output_dir: Annotated[Path | None, typer.Option("-o", "--output-dir")] = None,
    metrics: Annotated[str, typer.Option(help="auto, or a comma list of text, extraction, tool")] = "auto",
    record_keys: Annotated[
        str | None, typer.Option("--record-keys", help="compare records on these keys")
    ] = None,
    compare_base: Annotated[bool, typer.Option(help="also score the base model; print before/after")] = False,
    limit: Annotated[int | None, typer.Option(min=1)] = None,
    turns: Annotated[str, typer.Option(help="all: every assistant turn; last: the final one")] = "all",
    mode: str = "generate",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1)] = None,
) -> None:
    """Score a tuned model on data with reference answers (ROUGE/BLEU, extraction F1, tool-call accuracy)."""
    from chattune.errors import ConfigError
    from chattune.evaluate.run import eval_from_config, run_eval
    from chattune.infer.generate import Sampling

    keys = [k.strip() for k in record_keys.split(",")] if record_keys else None
    common = dict(batch_size=batch_size, metrics=metrics, compare_base=compare_base, limit=limit, turns=turns,
                  record_keys=keys, console=err)  # fmt: skip
    if config is not None:
        from chattune.config import load_config

        cfg = load_config(config, overrides or [])
        sampling = Sampling(max_new_tokens=max_new_tokens or cfg.max_target_len)
        eval_from_config(
            cfg, adapter=adapter, data_file=data, output_dir=output_dir, sampling=sampling, **common
        )
        return
    if data is None or output_dir is None:
        raise ConfigError("give a config file, or --data FILE and -o DIR (with --model and/or --adapter)")
    sampling = Sampling(max_new_tokens=max_new_tokens or 256)
    run_eval(
        model=model,
        adapter=adapter,
        data_file=data,
        output_dir=output_dir,
        mode=mode,
        sampling=sampling,
        **common,
    )


@app.command()
def web(
    workspace: Annotated[
        Path, typer.Option("--workspace", help="folder with runs/, data/, labels.sqlite")
    ] = Path("workspace"),
    port: Annotated[int, typer.Option("--port")] = 8501,
    host: Annotated[
        str, typer.Option("--host", help="address to bind; anything but loopback requires signing in")
    ] = "127.0.0.1",
    login: Annotated[
        bool | None, typer.Option("--login/--no-login", help="require signing in (default: beyond loopback)")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="`admin: TOKEN` / `annotator: TOKEN` lines (else $CHATTUNE_WEB_ADMIN_TOKEN etc., else new)"
        ),
    ] = None,
    session_hours: Annotated[float, typer.Option(min=0.1, help="how long a sign-in lasts")] = 12.0,
) -> None:
    """Start the web app: labeling, training monitor, playground (sign-in with roles beyond loopback)."""
    from chattune.system import is_loopback
    from chattune.web.launch import run_web

    if login is False and not is_loopback(host):
        raise ConfigError(
            f"--no-login is refused on {host}: beyond loopback the app always requires signing in"
        )
    run_web(workspace, host=host, port=port, login=login, token_file=token_file, session_hours=session_hours)


@app.command()
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    template: TemplateOpt = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    tools: Annotated[Path | None, typer.Option(help="JSON list of tool definitions")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 512,
    temperature: float = 0.7,
    top_p: TopPOpt = 0.9,
    do_sample: DoSampleOpt = False,
    seed: int | None = None,
    pre_seq_len: PreSeqLenOpt = None,
) -> None:
    """Chat with a (tuned) model in the terminal; with --tools, tool calls ask you for the observation."""
    from chattune.infer.chat import load_tools, run_chat
    from chattune.infer.engine import load_engine
    from chattune.infer.generate import Sampling

    if tools is not None:
        load_tools(tools)  # a bad file fails before a large model loads
    engine = load_engine(model, adapter, tokenizer=tokenizer, template=template, pre_seq_len=pre_seq_len)
    sampling = Sampling(max_new_tokens, temperature, top_p, do_sample, seed)
    run_chat(engine, sampling, system=system, tools_file=tools, console=out)


@app.command()
def export(
    adapter: Annotated[
        Path, typer.Option("--adapter", help="a LoRA output dir (final/, best/, checkpoint-N/)")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="the standalone model dir to write")],
    model: ModelOpt = None,
    overwrite: bool = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf (a transformers dir) | gguf (one GGUF for llama.cpp) | ollama (the GGUF and a Modelfile)",
        ),
    ] = "hf",
    dtype: Annotated[str, typer.Option(help="hf: auto (the base's dtype) | fp32 | bf16 | fp16")] = "auto",
    gguf_type: Annotated[
        str,
        typer.Option(
            help="gguf/ollama: auto (the base's precision: f32, f16 or bf16) | f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 "
            "| q4_1 | q4_0"
        ),
    ] = "auto",
    trust_remote_code: bool = False,
) -> None:
    """Merge a LoRA adapter into its base: a model dir plain transformers loads, or a GGUF (+ Modelfile)."""
    from chattune.infer.export import FORMATS, export_gguf, export_merged

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "hf":
        gguf = export_gguf(
            model,
            adapter,
            output,
            console=err,
            fmt=fmt,
            gguf_type=gguf_type,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
        )
        out.print(
            f"GGUF → {gguf}" + (f"\nModelfile → {gguf.parent / 'Modelfile'}" if fmt == "ollama" else "")
        )
        return
    path = export_merged(
        model,
        adapter,
        output,
        console=err,
        overwrite=overwrite,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    out.print(f"merged model → {path}")


@app.command()
def serve(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    template: TemplateOpt = None,
    host: Annotated[
        str, typer.Option(help="address to bind; anything but loopback needs --api-key")
    ] = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="CHATTUNE_API_KEY", help="require Authorization: Bearer KEY")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="the model id clients see")] = None,
    insecure: Annotated[bool, typer.Option(help="allow a non-local bind without an API key")] = False,
) -> None:
    """An OpenAI-compatible API (/v1/chat/completions, /v1/models) around one model."""
    try:
        from chattune.serve import run_server
        from chattune.serve.server import refuse_unsafe_bind
    except ImportError as e:
        raise ChattuneError(f"serving needs the serve extra: pip install 'chattune[serve]' ({e})") from None
    from chattune.infer.engine import load_engine

    refuse_unsafe_bind(host, api_key, insecure)  # before the model load, which can take minutes
    engine = load_engine(model, adapter, template=template)
    run_server(engine, host=host, port=port, api_key=api_key, model_name=model_name, insecure=insecure)


@data_app.command("check")
def data_check(
    ctx: typer.Context,
    config: ConfigArg,
    overrides: Overrides = None,
    n: Annotated[int, typer.Option("-n", help="samples to show")] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per sample on stdout, nothing else")
    ] = False,
    split: Annotated[str, typer.Option(help="train or eval")] = "train",
) -> None:
    """Show how samples are tokenised and which tokens are learnt, then the data statistics."""
    from chattune.config import load_config
    from chattune.train.data_check import check_data

    cfg = load_config(config, overrides or [])
    check_data(cfg, split, n, as_json, out=out, err=err, before_libraries=_quiet_if_program(ctx))


@data_app.command("convert")
def data_convert(
    kind: Annotated[
        str,
        typer.Argument(
            help="tool-alpaca | advertise-gen | csv | alpaca | sharegpt | openai | context-target"
        ),
    ],
    source: Annotated[Path, typer.Argument(help="input file")],
    output: Annotated[Path, typer.Option("-o", "--output", help="output .jsonl")],
    to: Annotated[
        str | None, typer.Option(help="advertise-gen: prompt_response (default) or conversations")
    ] = None,
    mapping: Annotated[Path | None, typer.Option(help="csv: YAML mapping of message templates")] = None,
) -> None:
    """Convert a dataset into chattune's canonical JSONL."""
    from chattune.data.converters import run_converter

    options = {k: v for k, v in {"to": to, "mapping": mapping}.items() if v is not None}
    stats = run_converter(kind, source, output, **options)
    out.print(f"{kind}: read {stats.read:,}, wrote {stats.written:,}, skipped {stats.skipped:,} → {output}")
    for reason in stats.skipped_examples:
        out.print(f"  skipped: {reason}", markup=False)


@model_app.command("pull")
def model_pull(name: str, force: bool = False) -> None:
    """Fetch a default model and cache it as a plain transformers model dir."""
    from chattune.models.pull import pull_model

    out.print(f"{name} → {pull_model(name, force=force)}")


@model_app.command("list")
def model_list() -> None:
    """The default models and whether they are pulled."""
    from chattune.models.pull import list_models

    for m in list_models():
        out.print(m)


@model_app.command("convert-chatglm3")
def model_convert_chatglm3(source: Path, destination: Path) -> None:
    """Rewrite a THUDM ChatGLM3 checkpoint as a native transformers GLM model (no remote code)."""
    from chattune.models.chatglm3_convert import convert_chatglm3

    out.print(f"converted → {convert_chatglm3(source, destination)}")


def quiet_libraries() -> None:
    """Keep the console for our progress and errors: no deprecation chatter from the ML libraries, no
    weight-loading bars. Only their FutureWarnings are silenced, not the process's."""
    import warnings

    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"(transformers|peft|accelerate|datasets|torch|trl)(\.|$)"
    )
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _quiet_if_program(ctx: typer.Context) -> Callable[[], None]:
    """quiet_libraries, for a command to call once it needs the libraries (only in the `chattune` program)."""
    return quiet_libraries if ctx.find_root().obj is PROGRAM else (lambda: None)


@app.callback()
def _before_any_command(ctx: typer.Context) -> None:
    # `data` commands import transformers and datasets only when they need them, and quiet them then
    # (`data check` on an already encoded file needs neither: importing them would be most of its time)
    if ctx.obj is PROGRAM and ctx.invoked_subcommand != "data":
        quiet_libraries()


def main() -> None:
    """Entry point: run the app; user-facing errors become one paragraph on stderr and a non-zero exit."""
    try:
        app(obj=PROGRAM)
    except ChattuneError as e:
        err.print(f"[bold red]Error:[/] {e}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)
