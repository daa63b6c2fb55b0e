"""A run's output folder: its layout, the run record (`chattune.json`), and the checkpoints a resume trusts.

    OUTPUT_DIR/
      config.yaml          the run's config, as validated          trainer_log.jsonl   one line per log step
      loss.png             the curve                               checkpoint-N/       complete or absent
      best/, final/        model or adapter + tokenizer + chattune.json (what infer, serve, eval and export
                           read back, so they encode exactly as training did)
      .staging/            a checkpoint being written              .corrupt/           checkpoints that failed
      .X.tmp, .X.old       a result being written / the one it replaces (atomic.replace_dir)

Training writes it (train/), everything else reads it; nothing here imports a layer above the foundation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chattune.atomic import write_text
from chattune.errors import ConfigError
from chattune.limits import Limits

RUN_INFO = "chattune.json"
CONFIG = "config.yaml"
LOG = "trainer_log.jsonl"
PLOT = "loss.png"
FINAL, BEST = "final", "best"
STAGING = ".staging"  # a checkpoint is written here, then renamed into place
CORRUPT = ".corrupt"  # checkpoints that failed the check are moved here, never deleted
ADAPTER_CONFIG = "adapter_config.json"  # what makes a result dir a PEFT adapter
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS_RE = re.compile(r"^(adapter_model|model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
# what a run of ours writes before its first checkpoint; a dir holding only these was killed early
RUN_FILES = {CONFIG, LOG, PLOT, BEST}
# the config fields that decide how samples become tokens: recorded with every result, read back by inference
ENCODING_FIELDS = ("template", "format", "max_seq_len", "max_source_len", "max_target_len", "train_reasoning")


@dataclass
class RunInfo:
    """What a result dir records about the run that made it (`chattune.json`)."""

    base_model: str | None = None
    method: str | None = None
    template: str = "auto"
    format: str = "auto"
    limits: Limits = field(default_factory=Limits)
    train_reasoning: bool = True
    chattune_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. best/'s eval metric, an export's origin

    @classmethod
    def from_config(cls, cfg: Any, version: str) -> RunInfo:
        """The record of a run with config `cfg` (a TrainConfig)."""
        return cls(
            cfg.model, cfg.method, cfg.template, cfg.format, Limits.of(cfg), cfg.train_reasoning, version
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunInfo:
        """A record from its JSON form (older records lack some keys: the defaults fill them)."""
        values = dict(values)
        defaults = Limits()
        limits = Limits(
            *(
                values.pop(k, getattr(defaults, k))
                for k in ("max_seq_len", "max_source_len", "max_target_len")
            )
        )
        known = {
            k: values.pop(k)
            for k in ("base_model", "method", "template", "format", "train_reasoning", "chattune_version")
            if k in values
        }
        return cls(limits=limits, extra=values, **known)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: flat, as earlier versions wrote it."""
        values = {k: v for k, v in asdict(self).items() if k not in ("limits", "extra")}
        return {**values, **asdict(self.limits), **self.extra}

    def with_extra(self, **extra: Any) -> RunInfo:
        """A copy with more fields recorded."""
        return RunInfo(**{**self.__dict__, "extra": {**self.extra, **extra}})

    def write(self, directory: Path) -> None:
        """Write `chattune.json` into `directory`."""
        write_text(Path(directory) / RUN_INFO, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))


def read_run_info(result: str | Path | None) -> RunInfo:
    """What training recorded about a result dir: its `chattune.json`, else the run's `config.yaml` one level up
    (a checkpoint of an older run), else nothing known (defaults)."""
    if result is None:
        return RunInfo()
    result = Path(result)
    if (result / RUN_INFO).is_file():
        return RunInfo.from_dict(json.loads((result / RUN_INFO).read_text(encoding="utf-8")))
    config_file = result.parent / CONFIG
    if config_file.is_file():
        import yaml

        cfg = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        keys = (*ENCODING_FIELDS, "method")
        return RunInfo.from_dict({"base_model": cfg.get("model"), **{k: cfg[k] for k in keys if k in cfg}})
    return RunInfo()


# ---------------------------------------------------------------------------------------------- leftovers
def recover_leftovers(out: Path) -> None:
    """Undo what a killed save left behind: .staging/, half-written .X.tmp dirs, and .X.old dirs whose
    replacement never moved into place (replace_dir was killed between its two renames)."""
    shutil.rmtree(out / STAGING, ignore_errors=True)  # a checkpoint that never finished writing
    for child in out.iterdir():
        if not (child.name.startswith(".") and child.is_dir()):
            continue
        if child.name.endswith(".tmp"):
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.endswith(".old"):
            current = out / child.name[1 : -len(".old")]  # see atomic.old_dir
            if current.exists():
                shutil.rmtree(child, ignore_errors=True)
            else:
                os.replace(child, current)  # the complete previous version is better than none


def prepare_output_dir(cfg: Any, console: Any = None, *, rank_zero: bool = True) -> str | None:
    """Check the output dir of a run with config `cfg` (a TrainConfig) and decide where to resume from;
    returns a checkpoint path or None. Only rank 0 (`rank_zero`) cleans the dir; other processes of a
    distributed run reach the same decision read-only."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory")
    explicit = isinstance(cfg.resume, str) and cfg.resume != "auto"
    if not rank_zero:
        if cfg.overwrite_output_dir:
            return None
        if explicit:
            return cfg.resume
        if cfg.resume == "auto":
            found = find_resume_checkpoint(out, move_aside=False)
            return str(found) if found else None
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir {out} cannot be created: {e.strerror or e}") from None
    if cfg.overwrite_output_dir:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        return None
    recover_leftovers(out)
    if explicit:
        if not Path(cfg.resume).is_dir():
            raise ConfigError(f"resume: {cfg.resume} is not a checkpoint directory")
        problem = checkpoint_problem(Path(cfg.resume))
        if problem:
            raise ConfigError(f"resume: {cfg.resume} cannot be resumed from: {problem}")
        return cfg.resume
    if cfg.resume == "auto":
        found = find_resume_checkpoint(out, console)
        if found is not None:
            return str(found)
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    if cfg.resume == "auto" and visible and visible <= RUN_FILES:
        # a run of ours killed before its first checkpoint: nothing to keep, so start it again
        if console is not None:
            console.print("No checkpoint from the earlier run in this output_dir: starting afresh")
        for name in visible:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        return None
    if visible:
        done = " (it holds a finished run)" if (out / "final").exists() else ""
        raise ConfigError(
            f"output_dir {out} is not empty{done} and has no checkpoint to resume from; set "
            "overwrite_output_dir: true to start afresh there, or choose another output_dir"
        )
    return None


def trim_log(path: Path, step: int) -> None:
    """Drop log records written after the checkpoint a run resumes from (they will be written again)."""
    if path.is_file():
        kept = [r for r in read_log(path) if r.get("step", 0) <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a trainer_log.jsonl (a line cut short by a crash is skipped)."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


# ---------------------------------------------------------------------------------------------- checkpoints
def _safetensors_problem(path: Path) -> str | None:
    # the header states every tensor's byte range, so a truncated or padded file shows without loading it
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > path.stat().st_size:
                return f"{path.name} is truncated"
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return f"{path.name} is unreadable"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + size + max(ends, default=0) != path.stat().st_size:
        return f"{path.name} is truncated"
    return None


def _torch_file_problem(path: Path) -> str | None:
    # torch.save writes a zip whose directory sits at the end: a cut-off file has none
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (OSError, zipfile.BadZipFile):
        return f"{path.name} is truncated or unreadable"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint dir cannot be resumed from (missing or truncated files), or None when it is complete."""
    path = Path(path)
    state = path / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    weights = [p for p in path.iterdir() if p.is_file() and WEIGHTS_RE.match(p.name)]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{index.name} is unreadable"
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            return f"{missing[0]} is missing"
    deepspeed = any(p.name.startswith("global_step") and p.is_dir() for p in path.iterdir())
    if not weights and not deepspeed:
        return "no weights file (adapter_model.safetensors, model.safetensors) is in it"
    needed = [] if deepspeed else ["optimizer.pt", "scheduler.pt"]  # DeepSpeed keeps these in global_step*/
    for name in needed:
        if not (path / name).is_file():
            return f"{name} is missing"
    rng = sorted(path.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth is missing"
    for p in weights:
        problem = _safetensors_problem(p) if p.suffix == ".safetensors" else _torch_file_problem(p)
        if problem:
            return problem
    for p in [path / n for n in needed] + rng:
        problem = _torch_file_problem(p)
        if problem:
            return problem
    return None


def checkpoints_newest_first(out: Path) -> list[Path]:
    """The checkpoint-N dirs of `out`, highest step first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def last_good_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that passes `checkpoint_problem`, or None."""
    return next((p for p in checkpoints_newest_first(out) if checkpoint_problem(p) is None), None)


def find_resume_checkpoint(out: Path, console: Any = None, move_aside: bool = True) -> Path | None:
    """The newest complete checkpoint; newer broken ones are reported and (on rank 0) moved to .corrupt/."""
    for path in checkpoints_newest_first(out):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        where = ""
        if move_aside:
            # out of the way of get_last_checkpoint and checkpoint rotation, but kept for a look
            target = out / CORRUPT / path.name
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            where = f"; moved to {target}"
        if console is not None:
            console.print(
                f"[yellow]Warning: {path.name} cannot be resumed from ({problem}){where}; trying the one "
                "before it[/]",
                highlight=False,
            )
    return None
