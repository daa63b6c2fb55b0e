"""Request and response bodies of the OpenAI-compatible API, shaped exactly as OpenAI's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class StreamOptions(BaseModel):
    """`stream_options`: whether a last chunk carries the token usage."""

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Messages stay raw: the data converter validates them, as for training data."""

    # clients send fields this server does not use (user, logit_bias, metadata...); ignore rather than reject
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Any]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int | None = None


class FunctionCall(BaseModel):
    """A called function: its name and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCallOut(BaseModel):
    """One tool call in a reply."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCallOut):
    """A tool call in a stream chunk (OpenAI numbers them)."""

    index: int


class AssistantMessage(BaseModel):
    """The reply; `content` is null when the reply is only tool calls. `reasoning_content` carries a
    reasoning model's trace apart from the answer, as reasoning-model APIs (DeepSeek, vLLM) return it."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _drop_empty_calls(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for key in ("tool_calls", "reasoning_content"):  # OpenAI leaves the keys out of plain replies
            if out.get(key) is None:
                out.pop(key, None)
        return out


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    """The one choice of a non-streamed reply."""

    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    """A whole reply (`chat.completion`)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """What a stream chunk adds to the reply; unset fields are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    """The one choice of a stream chunk; `finish_reason` is null until the last chunk."""

    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed reply (`chat.completion.chunk`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chattune"


class ModelList(BaseModel):
    """`GET /v1/models`: the one model this server holds."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """OpenAI's error fields."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorDetail
