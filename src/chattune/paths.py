"""Where chattune keeps things on this machine: its home (models, caches, temp files)."""

from __future__ import annotations

import os
from pathlib import Path


def chattune_home() -> Path:
    """chattune's cache root: `$CHATTUNE_HOME`, default `~/.cache/chattune`."""
    return Path(os.environ.get("CHATTUNE_HOME") or "~/.cache/chattune").expanduser()


def models_home() -> Path:
    """Where pulled default models live, one folder per alias."""
    return chattune_home() / "models"


PULLED_MARKER = ".chattune-pulled.json"  # written last by a pull: its folder is complete


def model_dir(alias: str) -> Path:
    """Where the default model `alias` lives once pulled."""
    return models_home() / alias


def is_pulled(alias: str) -> bool:
    """Whether `alias` has been pulled completely (its marker file exists)."""
    return (model_dir(alias) / PULLED_MARKER).is_file()


def data_cache_home() -> Path:
    """Where encoded datasets are cached."""
    return chattune_home() / "cache" / "data"


def temp_home() -> Path:
    """Scratch space for work renamed into place when done (on the same filesystem as the results)."""
    return chattune_home() / "tmp"
