"""`chattune serve`: run the OpenAI-compatible app with uvicorn."""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI

from chattune.errors import ConfigError
from chattune.infer.engine import Engine
from chattune.serve.app import create_app
from chattune.serve.limits import ServeLimits
from chattune.system import is_loopback


def refuse_unsafe_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Raise before anything loads when the bind would expose the model without a key (and no --insecure)."""
    if api_key is not None and not api_key.strip():
        raise ConfigError("the API key is empty")
    if not is_loopback(host) and api_key is None and not insecure:
        raise ConfigError(
            f"refusing to serve on {host} without an API key: pass --api-key (or set CHATTUNE_API_KEY), "
            "bind to 127.0.0.1, or pass --insecure to accept the risk"
        )


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Warn when binding beyond loopback; refuse to do so without an API key unless `insecure`."""
    if not is_loopback(host):
        print(
            f"warning: serving on {host}, reachable from other machines"
            + ("" if api_key else " WITHOUT an API key: anyone who can connect can use the model"),
            file=sys.stderr,
        )
    refuse_unsafe_bind(host, api_key, insecure)


def build_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `app` (call `.run()`; set `.should_exit` to stop it)."""
    # no proxy headers: the server is meant to be reached directly, and they would let clients spoof addresses
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, proxy_headers=False, timeout_graceful_shutdown=5
    )
    return uvicorn.Server(config)


def run_server(
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    insecure: bool = False,
    limits: ServeLimits | None = None,
    log_level: str = "info",
) -> None:
    """Serve `engine` until interrupted; `model_name` (default: the engine's name) is what clients ask for."""
    check_exposure(host, api_key, insecure)
    name = model_name or engine.name
    app = create_app(engine, model_name=name, api_key=api_key, limits=limits)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {name} at http://{shown}:{port}/v1" + (" (API key required)" if api_key else ""),
        file=sys.stderr,
    )
    build_server(app, host, port, log_level).run()
