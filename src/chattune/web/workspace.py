"""The web app's workspace: runs/, data/ and labels.sqlite under one root; every path checked to stay inside.

A run started from the web app lives in runs/NAME/: config.yaml (as submitted), train.log (the child's
stdout and stderr), run.pid, and output/ (the training output_dir). The control files sit beside output/
rather than in it because `chattune train` refuses a non-empty output_dir without a checkpoint. Runs
trained from the command line straight into runs/NAME/ are listed too.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chattune.config import TrainConfig, build_config
from chattune.label.store import LabelStore
from chattune.rundir import LOG, read_log

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PID_FILE = "run.pid"
LOG_FILE = "train.log"
CONFIG_FILE = "config.yaml"
OUTPUT_DIR = "output"
PATH_KEYS = ("train_file", "eval_file", "test_file")


def resolve(root: str | Path, path: str | Path) -> Path:
    """`path` (relative to `root`, or absolute) as an absolute path; ValueError if it leaves the workspace."""
    base = Path(root).resolve()
    text = str(path).strip()
    if not text:
        raise ValueError("empty path: give a path inside the workspace, e.g. data/train.jsonl")
    # resolve() follows symlinks and '..', so a link or '../' pointing outside is caught as well
    full = (base / text).resolve()
    if full != base and base not in full.parents:
        raise ValueError(
            f"{text} is outside the workspace {base}: use a path inside it, e.g. data/file.jsonl"
        )
    return full


@dataclass
class RunInfo:
    """A run's state as read from its files."""

    name: str
    path: Path
    output: Path
    status: str  # running | finished | failed | stopped | new
    step: int = 0
    last_loss: float | None = None
    eta_s: float | None = None
    progress: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)
    pid: int | None = None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a child that exited but was not reaped still answers kill(0); /proc tells them apart on Linux
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Workspace:
    """One workspace root with runs/, data/ and the label database."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        for sub in ("runs", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def runs_dir(self) -> Path:
        """Where runs live."""
        return self.root / "runs"

    @property
    def data_dir(self) -> Path:
        """Where datasets and exports live."""
        return self.root / "data"

    @property
    def labels_path(self) -> Path:
        """The label database file."""
        return self.root / "labels.sqlite"

    def resolve(self, path: str | Path) -> Path:
        """A user-typed path, checked to lie inside the workspace."""
        return resolve(self.root, path)

    def relative(self, path: Path) -> str:
        """A path as the user sees it: relative to the workspace root."""
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    def store(self) -> LabelStore:
        """The workspace's label store."""
        return LabelStore(self.labels_path)

    def model_source(self, text: str) -> str:
        """A base model: a directory inside the workspace, or else a hub id / default-model alias."""
        text = text.strip()
        if not text:
            raise ValueError("choose a base model: a directory inside the workspace, or a hub id")
        try:
            local = self.resolve(text)
        except ValueError:
            local = None
        if local is not None and local.exists():
            return str(local)
        if HUB_ID.match(text):
            return text
        raise ValueError(f"{text} is neither a model directory inside the workspace nor a hub id")

    # ---------------------------------------------------------------- runs

    def run_names(self) -> list[str]:
        """Run directories, newest first."""
        dirs = [p for p in self.runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [p.name for p in sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def run(self, name: str) -> RunInfo:
        """The state of one run, from its files."""
        if not RUN_NAME.match(name):
            raise ValueError(f"{name!r} is not a run name (letters, digits, '.', '_' and '-')")
        path = self.resolve(Path("runs") / name)
        output = path / OUTPUT_DIR if (path / OUTPUT_DIR).is_dir() else path
        log = read_log(output / LOG)
        pid = _read_pid(path / PID_FILE)
        if pid is not None and pid_alive(pid):
            status = "running"
        elif (output / "final").is_dir():
            status = "finished"
        elif pid is not None and (path / "stopped").exists():
            status = "stopped"
        elif pid is not None or log:
            status = "failed"  # a child that is gone without final/ ended early
        else:
            status = "new"
        info = RunInfo(name, path, output, status, log=log, pid=pid)
        losses = [r for r in log if r.get("loss") is not None]
        if log:
            last = log[-1]
            info.step = int(last.get("step", 0))
            info.eta_s = last.get("eta_s")
            elapsed = float(last.get("elapsed_s") or 0)
            info.progress = elapsed / (elapsed + info.eta_s) if info.eta_s is not None and elapsed else 0.0
        if status == "finished":
            info.progress, info.eta_s = 1.0, 0.0
        if losses:
            info.last_loss = float(losses[-1]["loss"])
        return info

    def runs(self) -> list[RunInfo]:
        """Every run in the workspace."""
        return [self.run(n) for n in self.run_names() if RUN_NAME.match(n)]

    def adapters(self) -> list[str]:
        """Output dirs a playground can load (final, best, checkpoint-N), relative to the workspace."""
        found = []
        for info in self.runs():
            for sub in ("final", "best"):
                if (info.output / sub).is_dir():
                    found.append(self.relative(info.output / sub))
            ckpts = sorted(info.output.glob("checkpoint-*"), key=lambda p: _step(p.name), reverse=True)
            found += [self.relative(p) for p in ckpts if p.is_dir()]
        return found

    def validate_config(self, text: str, name: str) -> TrainConfig:
        """Parse and validate a YAML config for run `name`; its paths must stay inside the workspace.

        Raises ValueError (bad name, path or YAML) or ConfigError (invalid settings).
        """
        if not RUN_NAME.match(name):
            raise ValueError(f"{name!r} is not a run name (letters, digits, '.', '_' and '-')")
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"the config is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ValueError("the config must be a YAML mapping of key: value")
        if values.get("trust_remote_code"):
            raise ValueError(
                "trust_remote_code runs code shipped with a model; it cannot be switched on from the web app. "
                "Start such a run with `chattune train` on the server, where you can read that code first."
            )
        for key in PATH_KEYS:
            if isinstance(values.get(key), str):
                self.resolve(values[key])  # raises for paths outside
        for key in ("model", "tokenizer"):
            if isinstance(values.get(key), str):
                self.model_source(values[key])
        if isinstance(values.get("deepspeed"), str) and values["deepspeed"] not in ("zero2", "zero3"):
            self.resolve(values["deepspeed"])
        if isinstance(values.get("resume"), str) and values["resume"] != "auto":
            self.resolve(values["resume"])
        # the run's output always goes to runs/NAME/output, whatever the config says
        values["output_dir"] = str(Path("runs") / name / OUTPUT_DIR)
        return build_config(values, f"config for run {name}")

    def start_run(self, name: str, config_text: str) -> RunInfo:
        """Validate the config, then start `chattune train` on it as a child process writing train.log."""
        cfg = self.validate_config(config_text, name)
        info = self.run(name) if (self.runs_dir / name).is_dir() else None
        if info is not None and info.status == "running":
            raise ValueError(f"run {name} is already running (pid {info.pid})")
        path = self.runs_dir / name
        path.mkdir(parents=True, exist_ok=True)
        cfg_path = path / CONFIG_FILE
        cfg_path.write_text(yaml.safe_dump(cfg.model_dump(exclude_defaults=True), sort_keys=False))
        (path / "stopped").unlink(missing_ok=True)
        with (path / LOG_FILE).open("ab") as log:
            # an argument list, never a shell string; cwd=root so the config's relative paths mean the workspace
            proc = subprocess.Popen(
                [sys.executable, "-m", "chattune", "train", str(cfg_path)],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # unbuffered: the log tail stays live and in order (stdout would be block-buffered into a file)
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # survives the web server's Ctrl+C, and stop() can signal its group
            )
        _write_pid(path / PID_FILE, proc.pid)
        return self.run(name)

    def stop_run(self, name: str, wait_s: float = 10.0) -> RunInfo:
        """Terminate a running run (SIGTERM, then SIGKILL if it lingers)."""
        info = self.run(name)
        if info.status != "running" or info.pid is None:
            raise ValueError(f"run {name} is not running")
        (info.path / "stopped").touch()
        _signal(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and pid_alive(info.pid):
            _reap(info.pid)
            time.sleep(0.1)
        if pid_alive(info.pid):
            _signal(info.pid, signal.SIGKILL)
            time.sleep(0.2)
        _reap(info.pid)
        return self.run(name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The last lines of a run's train.log."""
        path = self.run(name).path / LOG_FILE
        if not path.is_file():
            return ""
        with path.open("rb") as fh:  # read only the end: logs of long runs grow large
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _step(name: str) -> int:
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_pid(path: Path, pid: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(pid))
    tmp.replace(path)


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own session: reach any workers it started too
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie (harmless for others' pids)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def current() -> Workspace:
    """The app's workspace: set by a test in session state, else the script argument, else $CHATTUNE_WORKSPACE."""
    import streamlit as st

    if "workspace" not in st.session_state:
        root = None
        if len(sys.argv) > 1 and Path(sys.argv[0]).name == "app.py":  # `streamlit run app.py -- DIR`
            root = sys.argv[1]
        st.session_state["workspace"] = str(root or os.environ.get("CHATTUNE_WORKSPACE") or "workspace")
    return Workspace(st.session_state["workspace"])
