"""An OpenAI-compatible API around one loaded model (needs the `serve` extra: fastapi, uvicorn, sse-starlette)."""

from chattune.serve.app import create_app
from chattune.serve.errors import APIError
from chattune.serve.limits import ServeLimits
from chattune.serve.server import build_server, run_server

__all__ = ["APIError", "ServeLimits", "build_server", "create_app", "run_server"]
