"""A real uvicorn serving a chattune app on a free loopback port, shared by the serve tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
import pytest

from chattune.infer.engine import Engine
from chattune.serve import build_server, create_app


@contextmanager
def _serving(engine: Engine, api_key: str | None, **kw: Any) -> Iterator[str]:
    """Serve in a thread; yields the base URL once /health answers, stops the server afterwards."""
    app = create_app(engine, model_name="tiny", api_key=api_key, **kw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks the port; handing uvicorn the socket leaves no race
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = build_server(app, "127.0.0.1", 0, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="session")
def serving() -> Callable[..., AbstractContextManager[str]]:
    """`with serving(engine, api_key, **create_app_kwargs) as base_url:` — a real server for the block."""
    return _serving
