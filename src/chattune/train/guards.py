"""Guards around a training run: Ctrl-C saves and stops, a NaN/inf loss stops (or skips), running out of memory
or disk ends in one message, and the output dir is writable before training starts."""

from __future__ import annotations

import math
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from chattune.errors import ChattuneError, ConfigError, OutOfMemory
from chattune.rundir import last_good_checkpoint
from chattune.system import this_process

if TYPE_CHECKING:
    from torch.nn import Module


class StopRequest(TrainerCallback):
    """Ends training at the next step boundary: a first Ctrl-C saves a checkpoint first; a NaN/inf loss
    stops without one (after `max_bad_steps` skipped steps, when skipping is configured)."""

    def __init__(self, max_bad_steps: int = 0, console: Any = None) -> None:
        self.interrupted = False
        self.bad_loss: tuple[int, float] | None = None
        self.max_bad_steps, self.console = max_bad_steps, console
        self.skipped: list[int] = []
        self._step_loss: float | None = None  # the first non-finite micro-batch loss of the current step

    def note_loss(self, loss: Any) -> None:
        """Called by the trainer with every micro-batch loss; remembers a non-finite one for this step."""
        value = float(loss.detach().float().mean()) if hasattr(loss, "detach") else float(loss)
        if not math.isfinite(value) and self._step_loss is None:
            self._step_loss = value

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        bad = self._step_loss is not None
        if args.world_size > 1:  # every process must take the same decision, or they stop out of step
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([1.0 if bad else 0.0], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() and not bad:
                    self._step_loss = float("nan")  # another process saw it; its value is not shared
                bad = bool(flag.item())
        if bad and optimizer is not None:
            # without gradients the optimizer leaves these weights (and their Adam moments) untouched
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_loss is not None:
            value, self._step_loss = self._step_loss, None
            if len(self.skipped) < self.max_bad_steps:
                self.skipped.append(state.global_step)
                if self.console is not None and state.is_world_process_zero:
                    self.console.print(
                        f"[yellow]step {state.global_step}: the loss is {value}; this step was skipped "
                        f"({len(self.skipped)} of skip_nan_steps: {self.max_bad_steps})[/]",
                        highlight=False,
                    )
            elif self.bad_loss is None:
                self.bad_loss = (state.global_step, value)
                control.should_training_stop = True
                # nothing after a bad step may be written: checkpoint, eval and best/ would all hold its weights
                control.should_save = False
                control.should_evaluate = False
                return control
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control


@contextmanager
def interrupt_saves(stop: StopRequest, console: Any) -> Iterator[None]:
    """First Ctrl-C: finish the step, save a checkpoint, stop. Second Ctrl-C: stop at once."""
    if this_process().local_rank != 0:  # torchrun children: rank 0 reports for all
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if stop.interrupted:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.interrupted = True
        console.print(
            "[yellow]Interrupted: saving a checkpoint after this step (Ctrl-C again to quit now)[/]"
        )

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_output_dir_writable(out: Path, needed_bytes: int) -> None:
    """Fail before training when output_dir cannot be written or its disk lacks room for checkpoints."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir {out} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(out).free
    if free < needed_bytes:
        raise ConfigError(
            f"output_dir {out} has {free / 2**30:.2f} GiB free, but checkpoints of this run need about "
            f"{needed_bytes / 2**30:.2f} GiB; free some space or choose another output_dir"
        )


def checkpoint_bytes(model: Module, save_total_limit: int | None) -> int:
    """A rough size of the checkpoints kept at once: trained weights + 2 Adam moments each, plus final/."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    kept = (save_total_limit or 3) + 2  # the checkpoints kept, best/ and final/
    return trainable * 3 * kept


@contextmanager
def resume_load(checkpoint: str | None) -> Iterator[None]:
    """Errors loading a checkpoint's state become one ChattuneError naming the checkpoint and what to do."""
    import pickle

    try:
        yield
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, KeyError) as e:
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise ChattuneError(
            f"cannot resume from {checkpoint}: loading its state failed ({reason}). Its files are damaged, "
            "were replaced, or belong to a run with other settings (files that would need arbitrary code to "
            "unpickle are refused); move the checkpoint away to resume from the one before it, or set "
            "overwrite_output_dir=true to start over."
        ) from None


def _last_words(out: Path) -> str:
    last = last_good_checkpoint(out)
    return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"


def save_failed(what: str, out: Path, error: BaseException) -> ChattuneError:
    """The error for a save that failed mid-run: what was being saved, why, and what is still there."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        reason += f" ({error.filename})" if error.filename else ""
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ChattuneError(
        f"training stopped: saving {what} failed: {reason}; {_last_words(out)}. Free some disk space or fix "
        "the output_dir permissions, then run the same command to resume."
    )


def raise_if_stopped(stop: StopRequest, out: Path) -> None:
    """After `train()`: explain a NaN stop or an interrupt, naming the checkpoint to resume from."""
    where = _last_words(out)
    if stop.bad_loss is not None:
        step, value = stop.bad_loss
        raise ChattuneError(
            f"training stopped: the loss became {value} at step {step}; {where}. Lower learning_rate, or check "
            "the data (data check shows every token and label); skip_nan_steps: N skips up to N such steps."
        )
    if stop.interrupted:
        raise ChattuneError(f"training interrupted; {where}. Run the same command to resume (resume: auto).")


def interrupted_at_once_message(out: Path) -> str:
    """What a second Ctrl-C leaves behind."""
    return f"Stopped at once; {_last_words(out)}. Run the same command to resume."


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's refusal."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def out_of_memory(step: int, inputs: dict[str, Any], args: Any, device: str) -> OutOfMemory:
    """One paragraph for a step that ran out of memory: where, on what batch, and the levers that help."""
    rows, width = inputs["input_ids"].shape[:2]
    shape = (
        f"{width} tokens in one packed row"
        if "position_ids" in inputs and rows == 1
        else (f"{rows} samples x {width} tokens")
    )
    accum = args.gradient_accumulation_steps
    return OutOfMemory(
        f"out of memory on {device} at step {step}, in a micro-batch of {shape} "
        f"(batch_size {args.per_device_train_batch_size}, grad_accum {accum}). Levers, cheapest first: "
        f"halve batch_size and double grad_accum (batch_size={max(1, args.per_device_train_batch_size // 2)} "
        f"grad_accum={accum * 2}: the same samples per step, half the activations at once); lower max_seq_len "
        "(long samples are cut); gradient_checkpointing: mlp (or true) to recompute activations in backward; "
        "on a GPU, quantization_bit: 4 or 8 for the frozen base weights."
    )
