"""Start a server as a user does, signal it, and check it is gone: process, children, and port."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import psutil


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    """Whether some socket listens on `port` (any address)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def start(cmd: Sequence[str], health_url: str, log: Path, env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.Popen:  # fmt: skip
    """Run `cmd` (output to `log`) and wait until `health_url` answers 200."""
    proc = subprocess.Popen(list(cmd), stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout  # imports torch and transformers on a busy machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before answering: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{health_url} did not answer within {timeout} s: {log.read_text()[-3000:]}")


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_stops(proc: subprocess.Popen, sig: signal.Signals, port: int, within_s: float = 10) -> float:
    """Send `sig` to the server alone (not its group, as `kill PID` does) and check that it exits within
    `within_s`, leaves no process it started, and frees `port`; returns how long it took."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running {within_s} s after {sig.name}") from None
    took = time.monotonic() - started
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and (alive := [p for p in family[1:] if running(p)]):
        time.sleep(0.1)
    alive = [p for p in family[1:] if running(p)]
    assert not alive, f"{sig.name} left processes running: {[psutil.Process(p).cmdline() for p in alive]}"
    assert not port_taken(port), f"port {port} is still taken after {sig.name}"
    return took
