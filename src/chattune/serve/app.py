"""The OpenAI-compatible API around one loaded model: /health, /v1/models, /v1/chat/completions."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chattune.data.formats import FORMATS, Where
from chattune.data.schema import SourceRecord, ToolCall
from chattune.data.templates import split_reasoning
from chattune.errors import ConfigError, DataFormatError
from chattune.infer.engine import Engine
from chattune.infer.generate import Generation, Sampling
from chattune.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    FunctionCall,
    ModelCard,
    ModelList,
    ToolCallDelta,
    ToolCallOut,
    Usage,
)

log = logging.getLogger("chattune.serve")

OPEN_PATHS = ("/health",)  # answered without the API key: liveness probes carry no credentials
MAX_STOP_STRINGS = 4  # OpenAI's limit


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how many may wait for the model."""

    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_pending: int = 64  # admitted requests not yet answered in full; beyond this the server answers 429
    default_max_tokens: int = 512  # when a request gives no max_tokens (cut to what the context leaves)
    disconnect_poll_s: float = 0.25  # how often a non-streamed request checks that its client is still there

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value <= 0:
                raise ConfigError(f"ServeLimits.{name} must be positive, got {value}")


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def response(self) -> JSONResponse:
        """The JSON answer."""
        body = ErrorResponse(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        )
        return JSONResponse(body.model_dump(), status_code=self.status)


# ---------------------------------------------------------------- ASGI guard: API key and body size


class _Guard:
    """Checks the API key, then reads the whole body under the size limit before the app sees it.

    Pure ASGI (not BaseHTTPMiddleware) so that a counted, buffered body works for chunked uploads too and
    the client's disconnect still reaches the streaming response afterwards.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body = app, max_body_bytes
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                error = APIError(401, "missing API key: send the header `Authorization: Bearer KEY`")
                await error.response()(scope, receive, send)
                return
            if not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                await APIError(401, "incorrect API key", code="invalid_api_key").response()(
                    scope, receive, send
                )
                return
        too_large = APIError(
            413, f"the request body exceeds {self.max_body} bytes", code="request_too_large", param=None
        )
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await too_large.response()(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                await too_large.response()(scope, receive, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server's own receive does

        await self.app(scope, replay, send)


# ---------------------------------------------------------------- running generations one at a time


@dataclass
class _Done:
    """The end of a generation: the new token ids (stop token included when one was generated)."""

    tokens: list[int]


@dataclass
class _Job:
    """A validated request, ready to generate."""

    ids: list[int]
    sampling: Sampling
    stops: list[str]
    tools: bool  # read tool calls out of the reply (only when the request offered tools)
    include_usage: bool


class _Runner:
    """One model, so one generation at a time (on its own thread); requests wait in arrival order."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = asyncio.Lock()  # FIFO: waiters acquire in the order they asked
        self.pending = 0  # admitted requests whose response has not finished (see `reserve`)
        self.running = False

    def reserve(self, limit: int) -> _Slot | None:
        """A place among at most `limit` admitted requests, or None when all are taken.

        Taken at admission and held until the response has been sent in full: counting only from when
        generation was queued let a burst of streamed requests past the limit, since a stream reaches the
        queue only after its headers and first chunk are out.
        """
        if self.pending >= limit:
            return None
        self.pending += 1  # on the event loop thread only, so no lock is needed
        return _Slot(self)

    async def pieces(self, job: _Job, cancel: threading.Event) -> AsyncIterator[str | _Done]:
        """Text pieces as they are generated, then a `_Done`; the model is held until it is idle again."""
        async with self.lock:
            if cancel.is_set():  # the client left while queued
                return
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            ended = object()

            def post(item: Any) -> None:
                # RuntimeError: the event loop closed (server shut down), so nobody is listening
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, item)

            # the generation's own thread hands its text straight to this loop: no thread of ours in between
            generation = Generation(
                self.engine, job.ids, job.sampling, on_text=post, on_end=lambda: post(ended), cancel=cancel
            )
            self.running, finished = True, False
            generation.start()
            try:
                while (item := await queue.get()) is not ended:
                    yield item
                finished = True
                yield _Done(generation.result())  # generate's error, if it raised, is raised here
            finally:
                # on disconnect or error: stop the model, and keep it until it has really stopped,
                # so the next request never runs beside a generation that is still finishing
                cancel.set()
                with anyio.CancelScope(shield=True):
                    while not finished and await queue.get() is not ended:
                        pass
                self.running = False


class _Slot:
    """One admitted request's place in the queue; released once, however the request ends."""

    def __init__(self, runner: _Runner):
        self.runner, self.held = runner, True

    def release(self) -> None:
        """Give the place back (again is a no-op)."""
        if self.held:
            self.held = False
            self.runner.pending -= 1


class _HeldEventSource(EventSourceResponse):
    """An event stream that gives its slot back when the response ends: sent, failed or disconnected.

    Releasing in `__call__` rather than in the event generator also covers a client that leaves before
    the generator ever starts, when the generator's own cleanup would never run.
    """

    def __init__(self, slot: _Slot, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


class _StopScanner:
    """Cuts the raw reply at the first OpenAI `stop` string, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.stopped = stops, "", False
        self._longest = max((len(s) for s in stops), default=0)

    def feed(self, piece: str) -> None:
        """Add generated text; after a stop string, further text is ignored."""
        if self.stopped or not piece:
            return
        start = max(0, len(self.text) - self._longest + 1)  # earlier text was already searched
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def settled(self) -> str:
        """The text no later piece can turn into the start of a stop string."""
        if self.stopped:
            return self.text
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
            default=0,
        )
        return self.text[: len(self.text) - hold]


# ---------------------------------------------------------------- the service


def _param_path(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') → 'messages[0].role'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _plain_message(m: Any, i: int) -> Any:
    """Text content parts joined into a string, and `developer` read as `system`; anything else as sent."""
    if not isinstance(m, dict):
        return m  # the converter names the problem
    m = dict(m)
    if m.get("role") == "developer":  # newer OpenAI clients send system prompts under this name
        m["role"] = "system"
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise APIError(
                    400, "only text content parts are supported", param=f"messages[{i}].content[{j}]"
                )
            texts.append(part["text"])
        m["content"] = "\n".join(texts)
    return m


def _call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False)),
    )


class _Service:
    """Validation, generation and OpenAI shapes for one engine."""

    def __init__(self, engine: Engine, model_name: str, limits: ServeLimits):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.runner = _Runner(engine)
        self.created = int(time.time())
        self.stop_ids = set(engine.template.stop_token_ids())

    def prepare(self, body: ChatCompletionRequest) -> _Job:
        """Validate a request and encode its prompt exactly as training encoded conversations."""
        if body.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        if len(body.messages) > self.limits.max_messages:
            raise APIError(
                400,
                f"too many messages: {len(body.messages)} (at most {self.limits.max_messages})",
                param="messages",
            )
        ctx = self.engine.context_length
        param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        requested = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        if requested is not None and not 0 < requested <= ctx:
            raise APIError(
                400,
                f"{param} must be between 1 and {ctx} (the model's context), got {requested}",
                param=param,
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
        record = {
            "messages": [_plain_message(m, i) for i, m in enumerate(body.messages)],
            "tools": body.tools,
        }
        try:
            conv = FORMATS.get("openai")(
                record, Where(SourceRecord("request", 0, record), require_target=False)
            )
        except DataFormatError as e:
            raise APIError(400, f"{e.field}: {e.reason}" if e.field else e.reason, param=e.field) from None
        try:
            ids = self.engine.template.encode_prompt(conv)
        except Exception as e:  # a chat template may reject a message order (raise_exception in Jinja)
            raise APIError(400, f"the model's chat template cannot render these messages: {e}") from None
        if len(ids) >= ctx:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens, but the model's context is {ctx} tokens (no room for a reply)",
                param="messages",
                code="context_length_exceeded",
            )
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
        sampling = Sampling(
            max_new_tokens=min(requested or self.limits.default_max_tokens, ctx - len(ids)),
            temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            do_sample=temperature > 0,
            seed=body.seed,
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        tools = bool(body.tools) and body.tool_choice != "none"
        return _Job(ids, sampling, stops, tools, include_usage)

    def admit(self) -> _Slot:
        """A place in the queue, or 429 when it is full (before any response has started)."""
        slot = self.runner.reserve(self.limits.max_pending)
        if slot is None:
            raise APIError(
                429,
                f"the server is busy ({self.runner.pending} requests waiting)",
                type="rate_limit_error",
                code="busy",
            )
        return slot

    def reply(self, job: _Job, raw: str, final: bool = True) -> tuple[str, str | None, list[ToolCall]]:
        """Reasoning, content and tool calls of a raw reply; without tools offered, call-like text stays text.

        Mid-stream (`final` false) text that may still become a reasoning tag is held back, so what was
        sent never has to be taken back.
        """
        parsed = self.engine.template.parse_reply(raw, final)
        if parsed.error and final:  # a partial reply mid-stream often looks like a broken call
            log.info("reply not parsed as a tool call: %s", parsed.error)
        if parsed.tool_calls and job.tools:
            return parsed.reasoning, parsed.content or None, parsed.tool_calls
        if parsed.tool_calls:  # e.g. a JSON answer with a "name" field, when nobody offered tools
            answer = split_reasoning(raw, self.engine.template.reasoning_tags(), final)[1]
            return parsed.reasoning, answer.strip(), []
        return parsed.reasoning, parsed.content, []

    def finish_reason(self, job: _Job, scan: _StopScanner, done: _Done | None) -> str:
        """`length` when max_tokens ran out before a stop token or stop string; `stop` otherwise."""
        tokens = done.tokens if done else []
        ended = scan.stopped or (bool(tokens) and tokens[-1] in self.stop_ids)
        return "length" if not ended and len(tokens) >= job.sampling.max_new_tokens else "stop"

    def usage(self, job: _Job, done: _Done | None) -> Usage:
        """Token counts: the encoded prompt and every generated token."""
        n = len(done.tokens) if done else 0
        return Usage(prompt_tokens=len(job.ids), completion_tokens=n, total_tokens=len(job.ids) + n)

    async def complete(self, job: _Job, request: Request) -> ChatCompletion:
        """A whole reply; generation stops early if the client goes away."""
        cancel = threading.Event()
        scan, done = _StopScanner(job.stops), None

        async def watch() -> None:
            while not cancel.is_set():
                if await request.is_disconnected():
                    cancel.set()
                    return
                await asyncio.sleep(self.limits.disconnect_poll_s)

        watcher = asyncio.create_task(watch())
        try:
            async with contextlib.aclosing(self.runner.pieces(job, cancel)) as items:
                async for item in items:
                    if isinstance(item, _Done):
                        done = item
                    else:
                        scan.feed(item)
                        if scan.stopped:
                            cancel.set()
        except Exception as e:  # answered here, so the app's last-resort handler need not re-raise it
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}") from None
        finally:
            watcher.cancel()
        reasoning, content, calls = self.reply(job, scan.text)
        finish = "tool_calls" if calls else self.finish_reason(job, scan, done)
        message = AssistantMessage(
            content=content,
            reasoning_content=reasoning or None,
            tool_calls=[_call_out(c) for c in calls] or None,
        )
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=[Choice(message=message, finish_reason=finish)],
            usage=self.usage(job, done),
        )

    async def events(self, job: _Job) -> AsyncIterator[dict[str, str]]:
        """Server-sent `chat.completion.chunk` events, then `[DONE]`.

        With tools offered, the reply is only known to be text or a call once complete (a call's markup
        would otherwise leak out as content), so it is sent at the end; without tools, text streams as it
        is generated. Deltas are cut from the parsed content of the text so far, so they add up to exactly
        the non-streamed content.
        """
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(
            delta: Delta | None, finish: str | None = None, usage: Usage | None = None
        ) -> dict[str, str]:
            choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish)]
            body = ChatCompletionChunk(
                id=cid, created=created, model=self.model_name, choices=choices, usage=usage
            )
            data = body.model_dump(mode="json")
            if not job.include_usage:
                data.pop("usage")
            return {"data": json.dumps(data, ensure_ascii=False)}

        yield chunk(Delta(role="assistant", content=""))
        cancel = threading.Event()
        scan, done, sent, thought = _StopScanner(job.stops), None, "", ""
        try:
            async with contextlib.aclosing(self.runner.pieces(job, cancel)) as items:
                async for item in items:
                    if isinstance(item, _Done):
                        done = item
                        continue
                    scan.feed(item)
                    if scan.stopped:
                        cancel.set()
                    reasoning, visible, _ = self.reply(job, scan.settled(), final=False)
                    if reasoning.startswith(thought) and len(reasoning) > len(thought):
                        yield chunk(Delta(reasoning_content=reasoning[len(thought) :]))
                        thought = reasoning
                    if not job.tools and (visible or "").startswith(sent) and len(visible or "") > len(sent):
                        yield chunk(Delta(content=(visible or "")[len(sent) :]))
                        sent = visible or ""
        except Exception as e:  # the 200 header is out: report in the stream, as OpenAI does
            log.exception("generation failed")
            message = f"generation failed: {type(e).__name__}: {e}"
            error = ErrorResponse(error=ErrorDetail(message=message, type="server_error"))
            yield {"data": error.model_dump_json()}
            return
        reasoning, content, calls = self.reply(job, scan.text)
        if reasoning.startswith(thought) and len(reasoning) > len(thought):
            yield chunk(Delta(reasoning_content=reasoning[len(thought) :]))
        if content and content.startswith(sent) and len(content) > len(sent):
            yield chunk(Delta(content=content[len(sent) :]))
        if calls:
            deltas = [ToolCallDelta(index=i, **_call_out(c).model_dump()) for i, c in enumerate(calls)]
            yield chunk(Delta(tool_calls=deltas))
        yield chunk(Delta(), "tool_calls" if calls else self.finish_reason(job, scan, done))
        if job.include_usage:
            yield chunk(None, usage=self.usage(job, done))
        yield {"data": "[DONE]"}


# ---------------------------------------------------------------- the app


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return APIError(400, f"the request body is not valid JSON: {reason}")
    param = _param_path(tuple(first.get("loc", ())))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}{more}", param=param)


def create_app(
    engine: Engine, *, model_name: str, api_key: str | None = None, limits: ServeLimits | None = None
) -> FastAPI:
    """An OpenAI-compatible app serving `engine` as `model_name`; with `api_key`, /v1 needs `Bearer KEY`."""
    limits = limits or ServeLimits()
    service = _Service(engine, model_name, limits)
    app = FastAPI(title="chattune", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc).response()

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
        slot: _Slot | None = service.admit()
        try:
            # in a thread: tokenising a long prompt should not block /health
            job = await run_in_threadpool(service.prepare, body)
            if body.stream:
                response = _HeldEventSource(slot, service.events(job), sep="\n")
                slot = None  # the response releases it once sent
                return response
            completion = await service.complete(job, request)
        finally:
            if slot is not None:
                slot.release()
        return JSONResponse(completion.model_dump(mode="json"))

    return app
