"""The OpenAI request/response mapping for one engine: validation, generation and OpenAI shapes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from chattune.data.formats import FORMATS, Where
from chattune.data.schema import SourceRecord, ToolCall
from chattune.data.templates import split_reasoning
from chattune.errors import DataFormatError
from chattune.infer.engine import Engine
from chattune.infer.generate import Sampling
from chattune.serve.errors import APIError
from chattune.serve.limits import ServeLimits
from chattune.serve.runner import Done, Job, Runner, Slot
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
    ToolCallDelta,
    ToolCallOut,
    Usage,
)
from chattune.serve.stops import StopScanner

log = logging.getLogger("chattune.serve")

MAX_STOP_STRINGS = 4  # OpenAI's limit


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


class Service:
    """Validation, generation and OpenAI shapes for one engine."""

    def __init__(self, engine: Engine, model_name: str, limits: ServeLimits):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.runner = Runner(engine)
        self.created = int(time.time())
        self.stop_ids = set(engine.template.stop_token_ids())

    def prepare(self, body: ChatCompletionRequest) -> Job:
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
        return Job(ids, sampling, stops, tools, include_usage)

    def admit(self) -> Slot:
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

    def reply(self, job: Job, raw: str, final: bool = True) -> tuple[str, str | None, list[ToolCall]]:
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

    def finish_reason(self, job: Job, scan: StopScanner, done: Done | None) -> str:
        """`length` when max_tokens ran out before a stop token or stop string; `stop` otherwise."""
        tokens = done.tokens if done else []
        ended = scan.stopped or (bool(tokens) and tokens[-1] in self.stop_ids)
        return "length" if not ended and len(tokens) >= job.sampling.max_new_tokens else "stop"

    def usage(self, job: Job, done: Done | None) -> Usage:
        """Token counts: the encoded prompt and every generated token."""
        n = len(done.tokens) if done else 0
        return Usage(prompt_tokens=len(job.ids), completion_tokens=n, total_tokens=len(job.ids) + n)

    async def complete(self, job: Job, request: Request) -> ChatCompletion:
        """A whole reply; generation stops early if the client goes away."""
        cancel = threading.Event()
        scan, done = StopScanner(job.stops), None

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
                    if isinstance(item, Done):
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

    async def events(self, job: Job) -> AsyncIterator[dict[str, str]]:
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
        scan, done, sent, thought = StopScanner(job.stops), None, "", ""
        try:
            async with contextlib.aclosing(self.runner.pieces(job, cancel)) as items:
                async for item in items:
                    if isinstance(item, Done):
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
