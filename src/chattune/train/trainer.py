"""A thin transformers Trainer subclass: token counting, atomic checkpoints, and best/ by eval loss."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from chattune.atomic import fsync_tree, replace_dir
from chattune.compat.transformers import TrainerHooks
from chattune.data.batching import EpochSeededLengthGroupedSampler
from chattune.data.templates import IGNORE_INDEX
from chattune.rundir import STAGING, RunInfo
from chattune.train.callbacks import TokenCounter
from chattune.train.guards import is_out_of_memory, out_of_memory, resume_load, save_failed
from chattune.train.loss import split_backbone_and_head, trained_positions_loss

if TYPE_CHECKING:
    from torch.nn import Module

# what a failing write raises: OSError from Python, RuntimeError from torch.save's zip writer, SafetensorError
SAVE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, SafetensorError)


@dataclass
class BestTracker:
    """The metric best/ follows: lowest eval loss, or the highest generation metric (e.g. rouge-l)."""

    metric: str = "loss"
    value: float | None = None

    def improves(self, value: float) -> bool:
        """Whether `value` beats the best so far."""
        if self.value is None:
            return True
        return value < self.value if self.metric == "loss" else value > self.value

    def announce(self, value: float) -> str:
        """The line the ChatGLM tutorials print when the best model changes."""
        if self.metric == "loss":
            return f"Min eval loss has been updated: {self.value:.5f} --> {value:.5f}"
        return f"Best eval {self.metric} has been updated: {self.value:.5f} --> {value:.5f}"


class ChattuneTrainer(TrainerHooks):
    """Trainer with atomic checkpoint writes, a `best/` copy at the lowest eval loss, and token counts.

    Everything else (loss normalisation across accumulation, resume state, distributed engines) is the
    stock Trainer's.
    """

    def __init__(
        self,
        *args: Any,
        counter: TokenCounter,
        run_info: RunInfo,
        console: Any,
        best: BestTracker,
        generation_metrics: Callable[[Any], dict[str, float]] | None = None,
        loss_watch: Callable[[Any], None] | None = None,
        master_weights: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # fp32 master weights compute under bf16/fp16 autocast; the stock loss gets it from accelerate's
        # wrapped forward, while the trained-positions loss calls the backbone directly and enters it here
        self.master_weights = master_weights
        self.counter, self.run_info, self.console = counter, run_info, console
        self.loss_watch = loss_watch  # sees every micro-batch loss (StopRequest.note_loss)
        self.best, self.generation_metrics = best, generation_metrics
        self._staging: str | None = None
        self.split = split_backbone_and_head(self.model)
        if self.split is not None:
            self.divides_loss_itself()  # by the step's trained-token count

    # ------------------------------------------------------------------ order
    def train_sampler(self, dataset: Any) -> Any:
        """Length-grouped batches in an order every process builds from (seed, epoch)."""
        # accelerate then hands each process its share of the batches
        if self.args.train_sampling_strategy == "group_by_length" and "length" in dataset.column_names:
            group = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return EpochSeededLengthGroupedSampler(
                dataset["length"], group, self.args.data_seed or self.args.seed
            )
        return None

    def epoch_is_over(self) -> bool:
        """Resumed from the run's last step, the stock loop would still take one more step before it stops."""
        return self.state.global_step >= self.state.max_steps > 0

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Cross-entropy with the output head run only on trained positions (stock path where unsafe)."""
        if self.split is None or model is not self.model:  # wrapped (DDP, DeepSpeed): keep its forward hooks
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        autocast = self.accelerator.autocast() if self.master_weights else contextlib.nullcontext()
        with autocast:
            loss = trained_positions_loss(*self.split, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # gradients are averaged across processes
        return (loss, {"loss": loss}) if return_outputs else loss

    # ------------------------------------------------------------------ counting
    def training_step(self, model: Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        """One micro-batch; counts its non-pad and trained tokens for the speed readout."""
        mask = inputs.get("attention_mask")  # packed rows have no padding, hence no mask
        self.counter.tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self.counter.trained += int((inputs["labels"] != IGNORE_INDEX).sum())
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            device = str(inputs["input_ids"].device)
            raise out_of_memory(self.state.global_step + 1, inputs, self.args, device) from None
        if self.loss_watch is not None:
            self.loss_watch(loss)
        return loss

    # ------------------------------------------------------------------ resume
    def resume_errors(self, checkpoint: str | None) -> Any:
        """transformers loads every resume file with weights_only=True, so a tampered one cannot run code; its
        refusal (or a state that does not fit this run) becomes one sentence naming the checkpoint."""
        return resume_load(checkpoint)

    # ------------------------------------------------------------------ atomic checkpoints
    def staging_dir(self) -> str | None:
        """Where the checkpoint being saved is written before it is renamed into place."""
        return self._staging

    def commit_checkpoint(self, write: Callable[[], None]) -> None:
        """Write the checkpoint under .staging/, then rename it into place: complete or absent, never partial."""
        root = Path(self.args.output_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = str(root / STAGING)
        try:
            write()
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self._write_run_info(root / STAGING / name)
                fsync_tree(root / STAGING / name)
                replace_dir(root / STAGING / name, root / name)
        except SAVE_ERRORS as e:
            if self.args.should_save:
                shutil.rmtree(root / STAGING / name, ignore_errors=True)  # give back the space it took
            raise save_failed(f"the checkpoint at step {self.state.global_step}", root, e) from e
        finally:
            self._staging = None
        if self.args.should_save:
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=str(root), save_total_limit=self.args.save_total_limit, use_mtime=False
            )
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ best model
    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Eval loss (plus generation metrics when configured); keep best/ at the best value of `best_metric`."""
        metrics = super().evaluate(*args, **kwargs)
        if self.generation_metrics is not None and self.args.world_size == 1:
            generated = {f"eval_{k}": v for k, v in self.generation_metrics(self.model).items()}
            if generated:
                self.log(generated)
                metrics |= generated
        value = metrics.get(f"eval_{self.best.metric}")
        if value is not None and self.best.improves(value):
            if self.best.value is not None and self.args.should_save:
                self.console.print(self.best.announce(value), highlight=False)
            self.best.value = value
            info = {
                f"eval_{self.best.metric}": value,
                "best_metric": self.best.metric,
                "step": self.state.global_step,
            }
            self.save_result(Path(self.args.output_dir) / "best", info)
        return metrics

    def save_result(self, target: Path, extra: dict[str, Any] | None = None) -> None:
        """Save model (or adapter) and tokenizer to `target` atomically, with the run description beside them."""
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            self.save_model(str(tmp))
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(str(tmp))
                self._write_run_info(tmp, extra)
                fsync_tree(tmp)
                replace_dir(tmp, target)
        except SAVE_ERRORS as e:
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            what = f"{target.name}/ at step {self.state.global_step}"
            raise save_failed(what, Path(self.args.output_dir), e) from e

    def _write_run_info(self, directory: Path, extra: dict[str, Any] | None = None) -> None:
        # infer, serve and eval read this back so they encode exactly as training did
        self.run_info.with_extra(**(extra or {})).write(directory)
