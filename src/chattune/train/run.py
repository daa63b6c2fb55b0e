"""The training recipe, top to bottom: output dir → data → model → method → Trainer → final/."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from chattune import __version__
from chattune.config import TrainConfig, save_config
from chattune.errors import ConfigError
from chattune.rundir import (
    BEST,
    CONFIG,
    FINAL,
    LOG,
    RUN_INFO,
    RunInfo,
    prepare_output_dir,
    read_run_info,
    trim_log,
)

if TYPE_CHECKING:
    from torch.nn import Module
    from transformers import PreTrainedTokenizerBase

DEEPSPEED_PRESETS = ("zero2", "zero3")


def deepspeed_config(value: str | None) -> str | None:
    """A preset name (zero2, zero3) → the JSON shipped with chattune; a path as is."""
    if value is None:
        return None
    if value in DEEPSPEED_PRESETS:
        return str(Path(__file__).resolve().parents[1] / "presets" / f"deepspeed_{value}.json")
    if not Path(value).is_file():
        raise ConfigError(f"deepspeed: {value} is neither zero2, zero3 nor an existing JSON file")
    return value


def checkpointing_field(arguments_class: type) -> str:
    """Whole-layer checkpointing's TrainingArguments field: `activation_checkpointing` from transformers 5.2x
    on (the old name warns there), `gradient_checkpointing` before."""
    fields = getattr(arguments_class, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def training_arguments(cfg: TrainConfig, precision: str) -> Any:
    """transformers TrainingArguments from the config."""
    import torch
    from transformers import TrainingArguments

    has_eval = cfg.eval_file is not None
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        # transformers 5 took warmup_ratio into warmup_steps: a float below 1 there is a fraction of the steps
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(cfg.eval_steps or cfg.save_steps) if has_eval else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        optim="adamw_torch_fused",  # one kernel for all parameters, on CUDA and (torch >= 2.4) CPU alike
        **{checkpointing_field(TrainingArguments): cfg.gradient_checkpointing is True},  # `mlp` is ours
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        deepspeed=deepspeed_config(cfg.deepspeed),
        disable_tqdm=True,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        prediction_loss_only=True,
        logging_nan_inf_filter=False,  # the log shows a NaN as it is; StopRequest checks every loss itself
        dataloader_num_workers=0,
        save_only_model=False,
    )


def generation_metrics_fn(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, template: Any) -> Any:
    """A function scoring generated replies on the first eval samples, or None when not asked for."""
    if cfg.eval_generate_samples == 0 or cfg.eval_file is None:
        if cfg.best_metric != "loss":
            raise ConfigError(f"best_metric: {cfg.best_metric} needs eval_file and eval_generate_samples > 0")
        return None
    from itertools import islice

    from chattune.data.formats import read_samples
    from chattune.evaluate.generation import compute_generation_metrics
    from chattune.infer.engine import Engine
    from chattune.infer.generate import Sampling

    samples = [s for _, s in islice(read_samples(cfg.eval_file, cfg.format), cfg.eval_generate_samples)]
    sampling = Sampling(max_new_tokens=cfg.max_target_len)

    def score(model: Module) -> dict[str, float]:
        engine = Engine(model, tokenizer, template, "training", has_adapter=True)
        return compute_generation_metrics(
            engine, samples, metrics=cfg.metrics, sampling=sampling, limit=cfg.eval_generate_samples
        )

    return score


def run_training(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Train as the config says; returns the final/ directory."""
    import torch

    from chattune.data.batching import PackedCollator, PadCollator
    from chattune.data.cache import probe_key
    from chattune.data.check import print_sanity, print_stats
    from chattune.data.prepare import encode_split, template_for
    from chattune.models.load import half_frozen_weights, load_model, load_tokenizer, pick_precision
    from chattune.models.methods import apply_method, describe_trainable
    from chattune.system import available_cores, current_allocator, this_process
    from chattune.train.callbacks import RunLogCallback, TokenCounter
    from chattune.train.guards import (
        StopRequest,
        check_output_dir_writable,
        checkpoint_bytes,
        interrupt_saves,
        interrupted_at_once_message,
        raise_if_stopped,
    )
    from chattune.train.trainer import BestTracker, ChattuneTrainer

    console = console or Console(stderr=True, soft_wrap=True)
    cfg.require("train_file")
    if cfg.skip_nan_steps and cfg.deepspeed:
        raise ConfigError("skip_nan_steps needs a run without deepspeed (DeepSpeed owns the gradients)")
    process = this_process()
    resume_from = prepare_output_dir(cfg, console, rank_zero=process.is_main)
    out = Path(cfg.output_dir)
    # under torchrun the processes on one machine share its cores
    per_process = max(available_cores() // process.local_world_size, 1)
    torch.set_num_threads(cfg.num_threads or per_process)
    precision = pick_precision(cfg.precision)
    if precision == "bf16" and not torch.cuda.is_available() and cfg.precision == "bf16":
        console.print("[yellow]precision: bf16 on this CPU is slow unless it has AVX-512-BF16/AMX[/]")

    # data: tokenizer only, before any weights load, so data errors surface in seconds. The probe keys are
    # taken before the tokenizer loads, as `data check` takes them, so that it finds this run's encodings
    probes = {file: probe_key(cfg, file) for file in (cfg.train_file, cfg.eval_file) if file}
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code)
    template = template_for(cfg, tokenizer)
    train_set, train_stats = encode_split(
        cfg, tokenizer, template, cfg.train_file, console, probe=probes[cfg.train_file]
    )
    if len(train_set) == 0:
        raise ConfigError(f"{cfg.train_file} has no usable sample (see the statistics above)")
    first = train_set[0]
    print_sanity(console, tokenizer, first["input_ids"], first["labels"], first.get("reasoning") or ())
    print_stats(console, train_stats, "Training data")
    eval_set = None
    if cfg.eval_file:
        eval_set, eval_stats = encode_split(
            cfg, tokenizer, template, cfg.eval_file, console, probe=probes[cfg.eval_file]
        )
        print_stats(console, eval_stats, "Eval data")

    # model and method; seeded first so adapter initialisation is reproducible
    from transformers import set_seed

    set_seed(cfg.seed)
    # full/freeze learn in fp32 master weights under bf16/fp16 autocast unless pure_bf16 asks for bf16 weights
    master_weights = cfg.method in ("full", "freeze") and not (cfg.pure_bf16 and precision == "bf16")
    model = load_model(
        cfg.model,
        precision=precision,
        quantization_bit=cfg.quantization_bit,
        trust_remote_code=cfg.trust_remote_code,
        train_full_weights=master_weights,
    )
    if cfg.packing:
        from chattune.models.attention import register_packed_attention

        model.set_attn_implementation(register_packed_attention())
    model = apply_method(model, cfg)
    if master_weights and precision != "fp32":
        half_frozen_weights(model, precision)
    fused = ""
    if cfg.method == "lora" and cfg.fuse_lora:
        from chattune.models.fused_lora import fuse_lora_linears
        from chattune.models.fused_mlp import fuse_lora_mlps
        from chattune.models.fused_norm import fuse_rms_norms

        fused = f"{fuse_lora_mlps(model)} MLP blocks, {fuse_lora_linears(model)} projections"
        if norms := fuse_rms_norms(model):
            fused += f", {norms} RMSNorms"
    if cfg.gradient_checkpointing == "mlp":
        from chattune.models.checkpointing import checkpoint_mlps

        checkpoint_mlps(model)
    console.print(describe_trainable(model), highlight=False)
    if process.is_main:
        check_output_dir_writable(out, checkpoint_bytes(model, cfg.save_total_limit))
    console.print(
        f"precision: {precision}{' (fp32 master weights)' if master_weights and precision != 'fp32' else ''}"
        f"   threads: {torch.get_num_threads()}   template: {template.name}"
        f"   allocator: {current_allocator()}" + (f"   fused LoRA: {fused}" if fused else "")
    )

    if process.is_main:
        save_config(cfg, out / CONFIG)
    # the template as resolved (auto → hf, chatglm3 or raw), so inference does not have to guess again
    run_info = replace(RunInfo.from_config(cfg, __version__), template=template.name)
    counter = TokenCounter()
    stop = StopRequest(cfg.skip_nan_steps, console)
    trainer = ChattuneTrainer(
        model=model,
        args=training_arguments(cfg, precision),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=PackedCollator() if cfg.packing else PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        counter=counter,
        run_info=run_info,
        console=console,
        best=BestTracker(cfg.best_metric),
        generation_metrics=generation_metrics_fn(cfg, tokenizer, template) if cfg.eval_file else None,
        callbacks=[RunLogCallback(out, counter, console, title=out.name), stop],
        loss_watch=stop.note_loss,
        master_weights=master_weights and precision != "fp32",
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if resume_from and (out / BEST / RUN_INFO).is_file():
        trainer.best.value = read_run_info(out / BEST).extra.get(f"eval_{cfg.best_metric}")
    if resume_from:
        console.print(f"Resuming from {resume_from}")
        trim_log(out / LOG, int(Path(resume_from).name.rsplit("-", 1)[-1]))
    try:
        with interrupt_saves(stop, console):
            trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        console.print(f"[yellow]{interrupted_at_once_message(out)}[/]", highlight=False)
        raise
    raise_if_stopped(stop, out)
    final = out / FINAL
    trainer.save_result(final)
    console.print(f"[bold green]Done.[/] The result is in {final}")
    return final
