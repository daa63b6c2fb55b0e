"""Writes that readers never see half done: files through a temp name in the same folder, folders by rename.

A reader (a training run picking up exported data, `infer` reading a checkpoint, a second process) sees the old
content or the new, never a mix; an exception or Ctrl-C mid-write leaves the old content and no temp file.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(target: Path, private: bool = False) -> Iterator[Path]:
    """A temp path beside `target` for code that writes by path (savefig, Arrow, save_pretrained of one
    file); it becomes `target` when the block ends without an error. `private`: readable by this user only."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    # created here with the mode files get anyway (umask applies), so the result's permissions do not
    # depend on how the temp file was made
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666))
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(
    target: Path, mode: str = "w", *, private: bool = False, fsync: bool = False
) -> Iterator[IO[Any]]:
    """An open temp file beside `target` (text mode is UTF-8); it replaces `target` when the block ends.
    `fsync`: flushed to disk first, for files that must survive a power loss."""
    with atomic_path(target, private) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding, newline=None if encoding is None else "\n") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def write_text(target: Path, text: str, *, private: bool = False) -> None:
    """Replace `target` with `text` (UTF-8) atomically."""
    with atomic_file(target, private=private) as f:
        f.write(text)


def write_bytes(target: Path, data: bytes) -> None:
    """Replace `target` with `data` atomically."""
    with atomic_file(target, "wb") as f:
        f.write(data)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` (and the folders) to disk, so a renamed folder survives a power loss."""
    for dirpath, _, files in os.walk(root):
        for name in [*files, "."]:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def old_dir(dst: Path) -> Path:
    """Where `replace_dir` parks the previous `dst` between its two renames (`.NAME.old`)."""
    return dst.with_name(f".{dst.name}.old")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`, replacing an existing `dst`: readers see the old folder or the
    new one, never a mix. If the second rename fails the old folder is put back; a process killed between
    the two renames leaves `.NAME.old`, which `rundir.recover_leftovers` moves back."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = old_dir(dst)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        if not dst.exists():
            os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path, *, fsync: bool = False) -> Iterator[Path]:
    """An empty hidden folder beside `target` (`.NAME.tmp`) to fill; it replaces `target` when the block ends
    without an error, and is removed otherwise. `fsync`: flushed to disk before the rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")  # a run dir's recover_leftovers removes a killed one
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
