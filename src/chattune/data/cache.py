"""Find a file's cached encoding without loading the tokenizer: probe keys, their index files, token tables.

The full cache key (`encode.cache_key`) needs the loaded tokenizer, and loading one imports torch and
transformers: seconds, when `data check` on a cached file has nothing else to do. A probe key is computed from
what the tokenizer is loaded *from* instead: the config, the data file's identity, the identity of every
non-weight file in a local tokenizer dir, and the versions of the code that loads it. Whenever the normal path
finds or writes a cache entry it writes `<probe>.probe.json` pointing at the full key, with what printing needs
(the template's name, the tokenizer's name and a table of every id's token name, so that the sanity table
needs no tokenizer). Any doubt on the way back gives None, and the caller takes the normal path: slower,
never wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from chattune import __version__
from chattune.data.encode import ENCODING_REVISION, DataStats, entry_paths, file_identity, load_stats
from chattune.paths import is_pulled, model_dir
from chattune.rundir import ENCODING_FIELDS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from chattune.config import TrainConfig

# bump when the probe's inputs or the index's layout change
INDEX_FORMAT = 1
# weights never change how text is tokenised; leaving them out keeps a retrained model's dir a hit
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
# the libraries whose version can change what a tokenizer dir loads as, hence the full key
_LIBRARIES = ("transformers", "tokenizers", "sentencepiece")
# a "tokenizer dir" with more files than this is no tokenizer dir; statting it all would cost more than it saves
_MAX_DIR_FILES = 2000
# every config field the full key or the printout depends on: what changes the encoding (the run record's
# list), and where the tokenizer comes from and how bad records are treated
_CONFIG_FIELDS = (
    "model",
    "tokenizer",
    "trust_remote_code",
    "on_bad_record",
    "strict_fields",
    *ENCODING_FIELDS,
)


@dataclass
class CachedSplit:
    """What `data check` prints, read from the cache alone."""

    rows: list[dict[str, list[int]]]
    stats: DataStats
    template: str
    tokenizer: str
    tokens: TokenTable | None


class TokenTable:
    """Token names by id, exactly as the tokenizer's `convert_ids_to_tokens` gave them when indexed."""

    def __init__(self, names: list[str | None]) -> None:
        self.names = names

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """The name of each id; LookupError for an id the table does not hold (never a guess)."""
        size = len(self.names)
        out = []
        for i in ids:
            if not 0 <= i < size:
                raise LookupError(f"token id {i} is outside the table ({size} ids)")
            out.append(self.names[i])
        return out


def probe_key(cfg: TrainConfig, file: str) -> str | None:
    """A key for (data file, config, tokenizer files) that needs no tokenizer; None where it cannot be trusted."""
    if cfg.trust_remote_code:
        return None  # remote code may read any file, anywhere: only the full key is safe
    directory = _local_tokenizer_dir(cfg.tokenizer or cfg.model)
    if directory is None:
        return None  # a hub id: which files it loads is only known once loaded
    try:
        data = Path(file).resolve()
        if not data.is_file():
            return None  # the normal path explains what is wrong
        parts = {
            "format": INDEX_FORMAT,
            "file": [str(data), *file_identity(data.stat())],
            "config": {name: getattr(cfg, name) for name in _CONFIG_FIELDS},
            "tokenizer_dir": [str(directory), str(directory.resolve()), *_dir_identity(directory)],
            "versions": [__version__, ENCODING_REVISION, *map(_version, _LIBRARIES)],
        }
    except (OSError, _TooManyFiles):
        return None
    return _digest(json.dumps(parts, sort_keys=True).encode())


def remember(
    cache_dir: Path, probe: str, template_name: str, tokenizer: PreTrainedTokenizerBase, key: str
) -> None:
    """Index the cache entry `key` under `probe`, with what printing it needs; best effort, never an error."""
    try:
        entry = {
            "format": INDEX_FORMAT,
            "key": key,
            "template": template_name,
            "tokenizer": str(tokenizer.name_or_path),
        }
        index = _index_path(cache_dir, probe)
        if _already_indexed(cache_dir, _read_json(index), entry):
            return  # skip the token table, which walks the whole vocabulary
        names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        table = json.dumps(names).encode()
        entry["tokens"] = _digest(table)
        if not _tokens_intact(cache_dir, entry):  # content-addressed: one table serves every file it encoded
            _write_atomic(_tokens_path(cache_dir, entry), table)
        _write_atomic(index, json.dumps(entry).encode())
    except Exception:  # an index only saves time: failing to write one must never fail the command
        pass


def lookup(cache_dir: Path, probe: str, n: int, with_tokens: bool = True) -> CachedSplit | None:
    """The first `n` rows, the stats and the printing details of the entry indexed under `probe`, or None."""
    try:
        entry = _read_json(_index_path(cache_dir, probe))
        if not isinstance(entry, dict) or entry.get("format") != INDEX_FORMAT:
            return None
        key, template, tokenizer = entry["key"], entry["template"], entry["tokenizer"]
        if not all(isinstance(v, str) for v in (key, template, tokenizer)):
            return None
        arrow, meta = entry_paths(cache_dir, key)
        stats = load_stats(meta)
        rows, total = _head(arrow, n)
        if total != stats.kept:
            return None  # rows and statistics from different runs: trust neither
        tokens = _load_tokens(cache_dir, entry) if with_tokens else None
        if tokens is not None:
            for row in rows:  # an id the table lacks fails here, before anything is printed
                tokens.convert_ids_to_tokens(row["input_ids"])
    except (OSError, ValueError, TypeError, LookupError, AttributeError, pa.ArrowException):
        return None
    return CachedSplit(rows, stats, template, tokenizer, tokens)


class _TooManyFiles(Exception):
    pass


def _local_tokenizer_dir(source: str) -> Path | None:
    """The dir `models.load.resolve_path` gives for a local dir or a pulled alias; None for anything else."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if "/" not in source and is_pulled(source):  # a pulled default-model alias
        return model_dir(source)
    return None  # an alias to pull or a hub id: the normal path resolves (and may download) it


def _dir_identity(directory: Path) -> list[list[Any]]:
    """Name and identity of every non-weight file under `directory` (hidden dirs such as .git skipped)."""
    found: list[list[Any]] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(_WEIGHT_SUFFIXES):
                continue
            path = Path(root, name)
            found.append([str(path.relative_to(directory)), *file_identity(path.stat())])
            if len(found) > _MAX_DIR_FILES:
                raise _TooManyFiles
    return found


def _already_indexed(cache_dir: Path, known: Any, entry: dict[str, Any]) -> bool:
    if not isinstance(known, dict) or any(known.get(k) != v for k, v in entry.items()):
        return False
    return _tokens_intact(cache_dir, known)


def _tokens_intact(cache_dir: Path, entry: dict[str, Any]) -> bool:
    """Whether the entry's token table is on disk with the bytes its name (their hash) promises."""
    try:
        return _digest(_tokens_path(cache_dir, entry).read_bytes()) == entry["tokens"]
    except (OSError, KeyError, ValueError):
        return False


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _index_path(cache_dir: Path, probe: str) -> Path:
    return cache_dir / f"{probe}.probe.json"


def _tokens_path(cache_dir: Path, entry: dict[str, Any]) -> Path:
    digest = entry["tokens"]
    if not isinstance(digest, str) or not digest.isalnum():
        raise ValueError("bad token table name")
    return cache_dir / f"tokens-{digest}.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _load_tokens(cache_dir: Path, entry: dict[str, Any]) -> TokenTable:
    """The entry's token table; ValueError unless its bytes hash to its name (never a stale or torn table)."""
    table = _tokens_path(cache_dir, entry).read_bytes()
    if _digest(table) != entry["tokens"]:
        raise ValueError("token table does not match its name")
    names = json.loads(table)
    if not isinstance(names, list) or not all(n is None or isinstance(n, str) for n in names):
        raise ValueError("token table is not a list of names")
    return TokenTable(names)


def _head(arrow: Path, n: int) -> tuple[list[dict[str, list[int]]], int]:
    """The first n rows of an entry's Arrow stream and its row count, memory-mapped.

    Every batch's framing is read (milliseconds for 100,000 rows: the data stays on disk), so a torn file
    fails here as it would in `datasets`, instead of printing its intact head.
    """
    rows: list[dict[str, list[int]]] = []
    total = 0
    with pa.memory_map(str(arrow)) as source:
        for batch in pa.ipc.open_stream(source):
            total += batch.num_rows
            if len(rows) < n:
                part = batch.slice(0, n - len(rows))
                ids, labels = part.column("input_ids").to_pylist(), part.column("labels").to_pylist()
                rows.extend({"input_ids": a, "labels": b} for a, b in zip(ids, labels, strict=True))
    return rows, total


def _write_atomic(target: Path, data: bytes) -> None:
    """Write a file under a temp name, then move it into place: readers never see half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
