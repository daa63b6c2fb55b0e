"""`chattune serve` against hostile or careless use: where it listens, who gets in, what it logs, what it reads."""

from __future__ import annotations

import hmac
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

import httpx

from chattune.errors import ConfigError
from chattune.infer.engine import Engine, load_engine
from chattune.serve import ServeLimits
from chattune.serve.server import check_exposure

KEY = "sk-secret-7f3a9c1e5b2d4680"  # distinctive, so a grep of the logs finds any copy of it
HELLO = [{"role": "user", "content": "Hello! How can I help you today?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    """The environment without an API key inherited from the developer's shell."""
    return {k: v for k, v in os.environ.items() if k != "CHATTUNE_API_KEY"}


def assert_error_body(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


@contextmanager
def cli_server(model_dir: Path, *args: str) -> Iterator[tuple[str, int, list[str]]]:
    """`python -m chattune serve` as a user runs it; yields (base URL, port, output lines once stopped)."""
    port = free_port()
    cmd = [sys.executable, "-m", "chattune", "serve", "--model", str(model_dir), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=cli_env(), text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # imports torch and transformers on a busy machine
        while True:
            assert proc.poll() is None, "".join(lines)
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        yield base, port, lines
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully, flushing its logs
        try:
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(10)


# ---------------------------------------------------------------- where it listens, who gets in, what it logs


def test_cli_binds_loopback_and_never_logs_the_key(tiny_model_dir):
    """Default bind is 127.0.0.1 only; good and bad keys, at info log level, leave no copy of the key."""
    bad_keys = [KEY + "x", KEY[:-1], KEY.upper()]
    with cli_server(tiny_model_dir, "--api-key", KEY, "--model-name", "tiny") as (base, port, lines):
        assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1, and no other (v4 or v6) socket
        good = {"Authorization": f"Bearer {KEY}"}
        body = {"messages": HELLO, "max_tokens": 3}
        assert httpx.get(f"{base}/v1/models", headers=good).status_code == 200
        assert (
            httpx.post(f"{base}/v1/chat/completions", json=body, headers=good, timeout=60).status_code == 200
        )
        assert_error_body(httpx.post(f"{base}/v1/chat/completions", json={"messages": []}, headers=good), 400)
        responses = []
        for bad in bad_keys:
            for header in (f"Bearer {bad}", f"Basic {bad}", bad):
                r = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": header})
                assert_error_body(r, 401)
                responses.append(r.text)
        r = httpx.post(f"{base}/v1/chat/completions", json=body)
        assert_error_body(r, 401)
        assert "Bearer" in r.json()["error"]["message"]  # says how to authenticate, never what the key is
    output = "".join(lines)
    assert "POST /v1/chat/completions" in output and "401" in output  # the access log was captured
    assert "serving tiny at http://127.0.0.1:" in output and "(API key required)" in output
    for secret in [KEY, *bad_keys]:
        assert secret not in output, f"{secret} appears in the server's output"
        assert not any(secret in text for text in responses), "an error body echoes a key"
    assert "Traceback" not in output


def test_cli_refuses_a_public_bind_without_a_key(tiny_model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "chattune", "serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0",
           "--port", str(port)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=180)
    assert done.returncode != 0
    assert "refusing to serve on 0.0.0.0 without an API key" in done.stderr and "--insecure" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert listening_addresses(port) == []  # it never listened


def test_exposure_rules(capsys):
    for host in ("127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"):
        check_exposure(host, None, insecure=False)  # loopback: no key needed, nothing to warn about
        assert capsys.readouterr().err == ""
    for host in ("0.0.0.0", "::", "", "192.168.1.5", "example.com", "0"):
        with pytest.raises(ConfigError, match="without an API key"):
            check_exposure(host, None, insecure=False)
        assert "WITHOUT an API key" in capsys.readouterr().err
        check_exposure(host, None, insecure=True)  # --insecure: starts, but says what it means
        assert "anyone who can connect" in capsys.readouterr().err
        check_exposure(host, KEY, insecure=False)  # a key: starts, warns, and keeps the key to itself
        err = capsys.readouterr().err
        assert "reachable from other machines" in err and KEY not in err


# ---------------------------------------------------------------- in-process server for what needs the app


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return load_engine(str(tiny_model_dir))


def test_key_is_compared_in_constant_time(engine, monkeypatch, serving):
    """Every key check goes through hmac.compare_digest over the whole key (spied on, still doing the work)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with serving(engine, KEY) as base:
        for token, status in ((KEY[:4], 401), (KEY[:-1] + "X", 401), (KEY, 200)):
            r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == status, r.text
    assert calls == [(KEY[:4].encode(), KEY.encode()), ((KEY[:-1] + "X").encode(), KEY.encode()),
                     (KEY.encode(), KEY.encode())]  # fmt: skip


def test_request_limits_on_streamed_and_unauthenticated_bodies(engine, serving):
    """The body limit holds for chunked uploads (no Content-Length to refuse early on), and an unauthenticated
    client is turned away by the key check before its body counts."""
    limits = ServeLimits(max_body_bytes=4000)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def chunks(total: int) -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(total // 1000):
            yield b"x" * 1000
        yield b'"}]}'

    with serving(engine, KEY, limits=limits) as base:
        url = f"{base}/v1/chat/completions"
        error = assert_error_body(httpx.post(url, content=chunks(50_000), headers=headers), 413)
        assert "4000 bytes" in error["message"] and error["code"] == "request_too_large"
        no_key = {"Content-Type": "application/json"}
        assert_error_body(httpx.post(url, content=chunks(50_000), headers=no_key), 401)
        # just under the limit is still served
        small = httpx.post(url, json={"messages": HELLO, "max_tokens": 2}, headers=headers, timeout=60)
        assert small.status_code == 200, small.text


# ---------------------------------------------------------------- it stops when told


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_cli_server_stops_on_signal_even_mid_generation(tiny_model_dir, tmp_path, sig):
    """`kill` (TERM), Ctrl-C (INT) or a closed terminal (HUP) end `chattune serve` within seconds, also while a
    streamed reply is being generated (a random model talking until its token budget runs out), and free the
    port."""
    from tests.lifecycle import assert_stops, start

    port = free_port()
    cmd = [sys.executable, "-m", "chattune", "serve", "--model", str(tiny_model_dir), "--port", str(port)]
    proc = start(cmd, f"http://127.0.0.1:{port}/health", tmp_path / "serve.log", env=cli_env())
    body = {"model": "tiny", "messages": HELLO, "stream": True, "max_tokens": 100_000}
    streamed = threading.Event()

    def ask() -> None:
        try:
            with httpx.stream(
                "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60
            ) as r:
                for _ in r.iter_lines():
                    streamed.set()
        except httpx.HTTPError:
            pass  # the server went away mid-reply, as it should

    client = threading.Thread(target=ask, daemon=True)
    client.start()
    assert streamed.wait(60), (tmp_path / "serve.log").read_text()
    assert_stops(proc, sig, port, within_s=10)
    client.join(10)
