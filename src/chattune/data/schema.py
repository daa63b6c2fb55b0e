"""The canonical sample types every data format normalises to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "observation")

TOOLS_SYSTEM_PREFIX = (
    "Answer the following questions as best as you can. You have access to the following tools:\n"
)


@dataclass
class ToolCall:
    """A function call the assistant makes: the tool's name and its keyword arguments, in order."""

    name: str
    arguments: dict[str, Any]


@dataclass
class Message:
    """One turn. `loss=None` means the role's default (trained for assistant turns only)."""

    role: str
    content: str
    loss: bool | None = None
    metadata: str = ""
    tool_call: ToolCall | None = None
    tool_name: str | None = None  # for observations: which tool answered (chat templates want it)
    reasoning: str = ""  # an assistant turn's reasoning trace, written before its content or call

    @property
    def trained(self) -> bool:
        """Whether this message's tokens are learnt."""
        return self.loss if self.loss is not None else self.role == "assistant"


@dataclass
class Conversation:
    """A multi-turn sample: messages plus the tool definitions offered to the model."""

    messages: list[Message]
    tools: list[Any] | None = None


@dataclass
class Pair:
    """An input-output sample (prompt/response, context/target): no role markers, the prompt never trained."""

    prompt: str
    response: str


Sample = Conversation | Pair


@dataclass
class SourceRecord:
    """A raw JSON record and where it came from, so every error can name file, line and field."""

    file: str
    line: int
    value: Any
    extra: dict[str, Any] = field(default_factory=dict)
