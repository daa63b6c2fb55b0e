"""The machine facts and the allocator re-exec (chattune/system.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chattune import system
from chattune.errors import ConfigError


def test_available_cores_is_positive_and_within_the_machine() -> None:
    assert 1 <= system.available_cores() <= (os.cpu_count() or 1)


@pytest.fixture()
def lib_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A library folder of our own in place of the system's, so the test decides what is installed."""
    monkeypatch.setattr(system, "LIBRARY_DIRS", (str(tmp_path),))
    monkeypatch.setattr(system.sys, "prefix", str(tmp_path / "no-env"))
    return tmp_path


def test_auto_prefers_tcmalloc_then_jemalloc(lib_dir: Path) -> None:
    assert system.find_allocator("auto") is None
    (lib_dir / "libjemalloc.so.2").touch()
    assert system.find_allocator("auto") == lib_dir / "libjemalloc.so.2"
    assert system.find_allocator("tcmalloc") is None
    (lib_dir / "libtcmalloc_minimal.so.4").touch()
    assert system.find_allocator("auto") == lib_dir / "libtcmalloc_minimal.so.4"
    assert system.find_allocator("jemalloc") == lib_dir / "libjemalloc.so.2"


def test_a_named_allocator_that_is_missing_is_an_error_and_auto_is_quiet(
    lib_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with pytest.raises(ConfigError, match=r"allocator: jemalloc is not installed.*libjemalloc2"):
        system.use_allocator("jemalloc")
    system.use_allocator("auto")  # returns: nothing to preload, the process goes on as it is
    system.use_allocator("system")


def test_current_allocator_reads_the_preload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert system.current_allocator() == "jemalloc"
    monkeypatch.delenv("LD_PRELOAD")
    assert system.current_allocator() == "system"


PROGRAM = """
import os, sys
print("start", os.getpid(), sys.argv[1:], flush=True)
from chattune.system import current_allocator, use_allocator
use_allocator("auto")
print("now", os.getpid(), current_allocator(), flush=True)
"""


@pytest.mark.skipif(
    system.find_allocator("auto") is None, reason="neither tcmalloc nor jemalloc is installed"
)
def test_the_program_reruns_itself_with_the_allocator_same_pid_and_arguments() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(PROGRAM), "a", "b c"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout + done.stderr  # started twice (before and after the exec), ran once
    pid = lines[0].split()[1]
    assert lines[0] == lines[1] == f"start {pid} ['a', 'b c']"
    assert lines[2] in (f"now {pid} tcmalloc", f"now {pid} jemalloc")
    assert done.stderr == ""
