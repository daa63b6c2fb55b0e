"""Label records as the store holds them, the reports of import and export, and the rules they share."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from chattune.errors import ChattuneError

KINDS = ("instruction", "conversation")
STATUSES = ("pending", "draft", "accepted", "rejected")
EXPORT_FORMATS = ("conversations", "prompt_response", "context_target")


class LabelStoreError(ChattuneError):
    """A label-store operation that cannot be done (unknown id, bad status, bad format)."""


@dataclass
class Record:
    """One label record as the store holds it."""

    id: int
    kind: str
    instruction: str
    input: str
    output: str
    messages: list[dict[str, Any]]
    status: str
    author: str
    created_at: float
    updated_at: float
    deleted: bool = False
    source: str = ""
    tools: list[dict[str, Any]] = field(default_factory=list)

    def prompt_text(self) -> str:
        """The user's request as one string (instruction, then input on its own line)."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction

    def to_conversation(self) -> list[dict[str, Any]]:
        """The record as a `conversations` message list."""
        if self.kind == "conversation":
            return self.messages
        return [
            {"role": "user", "content": self.prompt_text()},
            {"role": "assistant", "content": self.output},
        ]


@dataclass
class ImportPreview:
    """What importing a file would do: the parsed rows, duplicates and unreadable records."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    total: int = 0


@dataclass
class ImportReport:
    """What importing a file did."""

    added: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


@dataclass
class ExportReport:
    """What exporting did: records written and those that the format cannot hold (with reasons)."""

    written: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    path: str = ""


def fingerprint(
    kind: str, instruction: str, input: str, output: str, messages: list[Any], tools: list[Any] | None = None
) -> str:
    """A content hash that identifies duplicates whatever their status or author."""
    # tools only when present, so records without them keep the hash they had before tools were stored
    parts = [kind, instruction, input, output, messages, *([tools] if tools else [])]
    body = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def row_fingerprint(row: dict[str, Any]) -> str:
    """The fingerprint of a row of label fields (from `add` or an imported file; fields it lacks are empty)."""
    return fingerprint(
        row["kind"], row.get("instruction", ""), row.get("input", ""), row.get("output", ""),
        row.get("messages", []), row.get("tools"),
    )  # fmt: skip


def checked_tools(tools: Any, kind: str = "conversation") -> list[dict[str, Any]]:
    """`tools` as stored: a list of JSON objects, and only on conversation records."""
    if not (isinstance(tools, list | None) and all(isinstance(t, dict) for t in tools or [])):
        raise LabelStoreError("expected a JSON list of tool definitions (objects)")
    if tools and kind != "conversation":
        raise LabelStoreError("only conversation records can offer tools")
    return list(tools or [])
