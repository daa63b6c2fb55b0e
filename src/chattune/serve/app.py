"""The OpenAI-compatible API around one loaded model: /health, /v1/models, /v1/chat/completions."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from chattune.infer.engine import Engine
from chattune.serve.errors import APIError, validation_error
from chattune.serve.guard import Guard
from chattune.serve.limits import ServeLimits
from chattune.serve.runner import Slot
from chattune.serve.schemas import ChatCompletionRequest, ModelCard, ModelList
from chattune.serve.service import Service

__all__ = ["APIError", "ServeLimits", "create_app"]

log = logging.getLogger("chattune.serve")


class HeldEventSource(EventSourceResponse):
    """An event stream that gives its slot back when the response ends: sent, failed or disconnected.

    Releasing in `__call__` rather than in the event generator also covers a client that leaves before
    the generator ever starts, when the generator's own cleanup would never run.
    """

    def __init__(self, slot: Slot, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


def create_app(
    engine: Engine, *, model_name: str, api_key: str | None = None, limits: ServeLimits | None = None
) -> FastAPI:
    """An OpenAI-compatible app serving `engine` as `model_name`; with `api_key`, /v1 needs `Bearer KEY`."""
    limits = limits or ServeLimits()
    service = Service(engine, model_name, limits)
    app = FastAPI(title="chattune", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and whether the model is busy."""
        runner = service.runner
        waiting = runner.pending - int(runner.running)
        return {"status": "ok", "model": model_name, "generating": runner.running, "waiting": waiting}

    @app.get("/v1/models")
    async def models() -> ModelList:
        """The one model this server holds."""
        return ModelList(data=[ModelCard(id=model_name, created=service.created)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        """The model, if that is its name."""
        if model_id != model_name:
            raise APIError(
                404, f"no model {model_id!r}; this server holds {model_name!r}", code="model_not_found"
            )
        return ModelCard(id=model_name, created=service.created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions, streamed (server-sent events) or whole."""
        # admitted before tokenising, so a flood of long prompts is turned away before it costs CPU
        slot: Slot | None = service.admit()
        try:
            # in a thread: tokenising a long prompt should not block /health
            job = await run_in_threadpool(service.prepare, body)
            if body.stream:
                response = HeldEventSource(slot, service.events(job), sep="\n")
                slot = None  # the response releases it once sent
                return response
            completion = await service.complete(job, request)
        finally:
            if slot is not None:
                slot.release()
        return JSONResponse(completion.model_dump(mode="json"))

    return app
