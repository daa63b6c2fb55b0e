"""Trainer callbacks: progress (bar on a terminal, tutorial-style lines otherwise), trainer_log.jsonl, loss.png."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from chattune.train.plot import plot_loss


@dataclass
class TokenCounter:
    """Tokens the trainer has consumed (non-pad and trained), filled in by the Trainer subclass."""

    tokens: int = 0
    trained: int = 0


def format_eta(seconds: float) -> str:
    """Seconds as HH:MM:SS."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLogCallback(TrainerCallback):
    """Writes trainer_log.jsonl and loss.png, and shows progress with speed and ETA."""

    def __init__(self, output_dir: Path, counter: TokenCounter, console: Console, title: str):
        self.output_dir, self.counter, self.console, self.title = output_dir, counter, console, title
        self.log_path = output_dir / "trainer_log.jsonl"
        self.progress: Progress | None = None
        self.task: Any = None
        self.start_time = 0.0
        self.start_step = 0
        self.start_tokens = (0, 0)
        self.last_loss: float | None = None

    # ------------------------------------------------------------------ progress
    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time, self.start_step = time.monotonic(), state.global_step
        self.start_tokens = (self.counter.tokens, self.counter.trained)
        if state.is_world_process_zero and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task(
                "train", total=state.max_steps, completed=state.global_step, info=""
            )
            self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info(state))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if state.is_world_process_zero:
            plot_loss(self.log_path, self.output_dir / "loss.png", self.title)

    def _speed(self, state) -> tuple[float, float, float]:
        """(steps/s, tokens/s, trained tokens/s) since this process started training."""
        elapsed = max(time.monotonic() - self.start_time, 1e-9)
        steps = state.global_step - self.start_step
        tokens = self.counter.tokens - self.start_tokens[0]
        trained = self.counter.trained - self.start_tokens[1]
        return steps / elapsed, tokens / elapsed, trained / elapsed

    def _eta(self, state) -> float:
        steps_per_s, _, _ = self._speed(state)
        return (state.max_steps - state.global_step) / steps_per_s if steps_per_s > 0 else 0.0

    def _info(self, state) -> str:
        _, tok_s, _ = self._speed(state)
        epoch = f"epoch {state.epoch:.2f}" if state.epoch is not None else ""
        loss = f"loss {self.last_loss:.4f}" if self.last_loss is not None else ""
        return "  ".join(x for x in (epoch, loss, f"{tok_s:,.0f} tok/s") if x)

    # ------------------------------------------------------------------ logs
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        steps_per_s, tok_s, trained_s = self._speed(state)
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                record["lr" if key == "learning_rate" else key] = logs[key]
        for key, value in logs.items():
            if key.startswith("eval_") and key not in record and isinstance(value, int | float):
                record[key] = value
        if "train_runtime" in logs:
            record["train_runtime"] = logs["train_runtime"]
        record |= {
            "tokens_per_s": round(tok_s, 2),
            "trained_tokens_per_s": round(trained_s, 2),
            "elapsed_s": round(time.monotonic() - self.start_time, 2),
            "eta_s": round(self._eta(state), 1),
        }
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if "loss" in logs:
            self.last_loss = logs["loss"]
            if self.progress is None:
                pct = 100 * state.global_step / max(state.max_steps, 1)
                self.console.print(
                    f"global step {state.global_step} ({pct:.2f}%) , epoch: {int(state.epoch or 0)}, "
                    f"loss: {logs['loss']:.5f}, speed: {steps_per_s:.2f} step/s, {tok_s:,.0f} tok/s, "
                    f"ETA: {format_eta(self._eta(state))}",
                    highlight=False,
                )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero:
            plot_loss(self.log_path, self.output_dir / "loss.png", self.title)
