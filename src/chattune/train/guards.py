"""Guards around a training run: Ctrl-C saves and stops, a NaN/inf loss stops, the output dir is writable."""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from chattune.errors import ChattuneError, ConfigError


class StopRequest(TrainerCallback):
    """Ends training at the next step boundary, saving a checkpoint first (first Ctrl-C, or a bad loss)."""

    def __init__(self) -> None:
        self.interrupted = False
        self.bad_loss: tuple[int, float] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and self.bad_loss is None:
            self.bad_loss = (state.global_step, loss)
            control.should_training_stop = True  # no checkpoint: its weights are already poisoned


@contextmanager
def interrupt_saves(stop: StopRequest, console: Any) -> Iterator[None]:
    """First Ctrl-C: finish the step, save a checkpoint, stop. Second Ctrl-C: stop at once."""
    if os.environ.get("LOCAL_RANK") not in (None, "0"):  # torchrun children: rank 0 reports for all
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


def checkpoint_bytes(model: Any, save_total_limit: int | None) -> int:
    """A rough size of the checkpoints kept at once: trained weights + 2 Adam moments each, plus final/."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    kept = (save_total_limit or 3) + 2  # the checkpoints kept, best/ and final/
    return trainable * 3 * kept


def raise_if_stopped(stop: StopRequest, out: Path) -> None:
    """After `train()`: explain a NaN stop or an interrupt, naming the checkpoint to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    if stop.bad_loss is not None:
        step, value = stop.bad_loss
        raise ChattuneError(
            f"training stopped: the loss became {value} at step {step}; {where}. Lower learning_rate, or check "
            "the data (data check shows every token and label)."
        )
    if stop.interrupted:
        raise ChattuneError(f"training interrupted; {where}. Run the same command to resume (resume: auto).")
