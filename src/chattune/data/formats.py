"""Data formats (one registry): detect a file's format and normalise each record to a canonical Sample."""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune.data.readers import iter_records, value_problem
from chattune.data.schema import Conversation, Message, Pair, Sample, SourceRecord, ToolCall
from chattune.errors import ConfigError, DataFormatError
from chattune.registry import Registry, did_you_mean

Normaliser = Callable[[Any, "Where"], Sample]
FORMATS: Registry[Normaliser] = Registry("data format", ConfigError)

_MAX_EXAMPLES = 5
# User values quoted in error messages stay short: a 1 MB role name must not become a 1 MB error.
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel = 60, 60, 3


@dataclass
class Where:
    """Where a record came from; builds errors that name file, line and field, and notes unread fields."""

    record: SourceRecord
    require_target: bool = True  # training needs something to learn; inference inputs may end at a question
    report: ReadReport | None = None
    strict_fields: bool = False  # a field the format does not read is an error, not a warning

    def error(self, reason: str, field: str | None = None) -> DataFormatError:
        """A DataFormatError at this record."""
        r = self.record
        return DataFormatError(reason, file=r.file, line=r.line, field=field, item=r.extra.get("item"))


@dataclass
class ReadReport:
    """What reading a file did: counts per format and the records skipped (never dropped silently)."""

    read: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)

    # message fields no reader of the format uses: name -> {count, first (file, line, field), hint}
    unknown_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    # record fields beside the data (ids, sources): name -> count
    extra_fields: dict[str, int] = field(default_factory=dict)

    def skip(self, error: DataFormatError) -> None:
        """Count a skipped record, keeping the first few reasons for the user."""
        self.skipped += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(error.describe())

    def unknown(self, name: str, where: Where, path: str, hint: str) -> None:
        """Count a field that will not be read, remembering where it first appeared."""
        seen = self.unknown_fields.setdefault(name, {"count": 0, "hint": hint})
        if not seen["count"]:
            seen["first"] = where.error("", f"{path}{name}").describe().rstrip(": ")
        seen["count"] += 1


# ---------------------------------------------------------------- helpers shared by normalisers


def _short(value: Any) -> str:
    return _repr.repr(value)


def _obj(value: Any, where: Where, name: str | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise where.error(f"expected a JSON object, got {type(value).__name__}", name)
    return value


def _str(obj: dict[str, Any], key: str, where: Where, path: str, *, required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise where.error("missing", f"{path}{key}")
        return None
    if not isinstance(obj[key], str):
        raise where.error(f"expected a string, got {type(obj[key]).__name__}", f"{path}{key}")
    return obj[key]


def _read_fields(obj: dict[str, Any], known: frozenset[str], where: Where, path: str = "") -> None:
    """Account for the fields of `obj` that no reader uses, so nothing is lost without a word.

    A message field (or a record field one edit away from a known one, like `tool` for `tools`) is
    reported as a warning with the file, the first line and a did-you-mean (`strict_fields: true`: an
    error); other record fields (ids, sources) are only listed in the statistics.
    """
    if obj.keys() <= known:  # the common case, checked without building a set
        return
    for name in obj.keys() - known:
        hint = did_you_mean(name, sorted(known))
        if path or hint:
            if where.strict_fields:
                raise where.error(
                    f"the format does not read this field (strict_fields: true).{hint}", path + name
                )
            if where.report is not None:
                where.report.unknown(name, where, path, hint)
        elif where.report is not None:
            where.report.extra_fields[name] = where.report.extra_fields.get(name, 0) + 1


def _reasoning(obj: dict[str, Any], where: Where, path: str, assistant: bool) -> str:
    """The reasoning trace under any of its names (one of them, or several that agree); assistants only."""
    if obj.keys().isdisjoint(REASONING_FIELDS):  # the common case, in one C-level check
        return ""
    given = [name for name in REASONING_FIELDS if obj.get(name) not in (None, "")]
    if not given:
        return ""
    if not assistant:
        raise where.error("only an assistant turn carries reasoning", path + given[0])
    values = {name: _str(obj, name, where, path) for name in given}
    if len(set(values.values())) > 1:
        raise where.error(f"{' and '.join(given)} differ; keep one reasoning field", path + given[1])
    return values[given[0]] or ""


def _loss(obj: dict[str, Any], where: Where, path: str) -> bool | None:
    loss = obj.get("loss")
    if loss is not None and not isinstance(loss, bool):
        raise where.error(f"expected true or false, got {_short(loss)}", f"{path}loss")
    return loss


def _loads(text: str, where: Where, path: str, what: str = "") -> Any:
    """JSON nested inside a string field (ShareGPT tools, OpenAI arguments), held to the reader's rules."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise where.error(f"{what}not valid JSON: {e.msg}", path) from None
    except RecursionError:
        raise where.error(f"{what}JSON nested too deeply", path) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise where.error(f"{what}not readable JSON: {e}", path) from None
    if problem := value_problem(value):
        inner = problem[1]
        raise where.error(problem[0], path + ("." + inner if inner and not inner.startswith("[") else inner))
    return value


def _tools(obj: dict[str, Any], key: str, where: Where) -> list[Any] | None:
    tools = obj.get(key)
    if isinstance(tools, str) and tools.strip():  # ShareGPT stores tools as a JSON string
        tools = _loads(tools, where, key)
    if tools is None or (isinstance(tools, (str, list)) and not tools):
        return None
    if not isinstance(tools, list):
        raise where.error(f"expected a list of tool definitions, got {type(tools).__name__}", key)
    for i, tool in enumerate(tools):  # a JSON schema object, or a text description (ToolAlpaca)
        if not isinstance(tool, (dict, str)):
            raise where.error(
                f"expected a tool definition (an object or a text), got {type(tool).__name__}", f"{key}[{i}]"
            )
    return tools


def _arguments(value: Any, where: Where, path: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = _loads(value, where, path, "tool arguments are ") if value.strip() else {}
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise where.error(f"expected an object of arguments, got {type(value).__name__}", path)
    return value


def observation_text(value: Any) -> str:
    """A tool result as text: strings as they are, anything else as JSON (ChatGLM3's convention)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def validate_conversation(conv: Conversation, where: Where, path: str = "conversations") -> Conversation:
    """Apply the rules every conversation obeys, whatever format it came from."""
    if not conv.messages:
        raise where.error("empty conversation", path)
    seen_user = False
    for i, m in enumerate(conv.messages):
        if m.role == "system" and (seen_user or any(p.role == "system" for p in conv.messages[:i])):
            reason = "system message after a user message" if seen_user else "a second system message"
            raise where.error(
                f"{reason}: at most one system message, before the first user message", f"{path}[{i}]"
            )
        seen_user = seen_user or m.role == "user"
    if where.require_target and not any(m.trained for m in conv.messages):
        raise where.error("no trainable message (no assistant turn, or every one has loss: false)", path)
    return conv


# ---------------------------------------------------------------- the formats


# the names users' files give an assistant turn's reasoning trace (ours first)
REASONING_FIELDS = ("reasoning", "reasoning_content", "thinking")
# the fields each format reads (anything else is reported, see _read_fields)
_CONVERSATIONS_RECORD = frozenset({"conversations", "tools"})
_CONVERSATIONS_MESSAGE = frozenset(
    {"role", "content", "loss", "metadata", "name", "parameters", "observation", *REASONING_FIELDS}
)
_PROMPT_RESPONSE = frozenset({"prompt", "response"})
_CONTEXT_TARGET = frozenset({"context", "target"})
_ALPACA = frozenset({"instruction", "input", "output", "system", "history"})
_SHAREGPT_RECORD = frozenset({"conversations", "system", "tools"})
_SHAREGPT_TURN = frozenset({"from", "value", *REASONING_FIELDS})
_OPENAI_RECORD = frozenset({"messages", "tools"})
_OPENAI_MESSAGE = frozenset(
    {"role", "content", "loss", "name", "tool_calls", "tool_call_id", *REASONING_FIELDS}
)


@FORMATS.register("conversations")
def _conversations(value: Any, where: Where) -> Conversation:
    """ChatGLM3's format: `conversations` of system/user/assistant/tool/observation, optional `tools`."""
    rec = _obj(value, where)
    _read_fields(rec, _CONVERSATIONS_RECORD, where)
    msgs = rec.get("conversations")
    if not isinstance(msgs, list):
        raise where.error("expected a list of messages", "conversations")
    out: list[Message] = []
    for i, m in enumerate(msgs):
        p = f"conversations[{i}]."
        m = _obj(m, where, p.rstrip("."))
        _read_fields(m, _CONVERSATIONS_MESSAGE, where, p)
        role = _str(m, "role", where, p)
        loss = _loss(m, where, p)
        reasoning = _reasoning(m, where, p, role in ("assistant", "tool"))
        if role == "tool":
            name = _str(m, "name", where, p)
            args = _arguments(m.get("parameters"), where, f"{p}parameters")
            call = ToolCall(name, args)
            out.append(Message("assistant", "", loss, metadata=name, tool_call=call, reasoning=reasoning))
            if "observation" in m:
                out.append(Message("observation", observation_text(m["observation"]), tool_name=name))
        elif role in ("system", "user", "assistant", "observation"):
            metadata = _str(m, "metadata", where, p, required=False) or ""
            content = _str(m, "content", where, p) or ""
            out.append(Message(role, content, loss, metadata=metadata, reasoning=reasoning))
        else:
            raise where.error(
                f"unknown role {_short(role)} (expected system, user, assistant, tool or observation)",
                f"{p}role",
            )
    return validate_conversation(Conversation(out, _tools(rec, "tools", where)), where)


@FORMATS.register("prompt_response")
def _prompt_response(value: Any, where: Where) -> Pair:
    """Input-output data: `prompt` → `response`."""
    rec = _obj(value, where)
    _read_fields(rec, _PROMPT_RESPONSE, where)
    return Pair(
        _str(rec, "prompt", where, ""), _str(rec, "response", where, "", required=where.require_target) or ""
    )


@FORMATS.register("context_target")
def _context_target(value: Any, where: Where) -> Pair:
    """The ChatGLM-6B LoRA tutorial's data: `context` → `target`."""
    rec = _obj(value, where)
    _read_fields(rec, _CONTEXT_TARGET, where)
    return Pair(
        _str(rec, "context", where, ""), _str(rec, "target", where, "", required=where.require_target) or ""
    )


@FORMATS.register("alpaca")
def _alpaca(value: Any, where: Where) -> Conversation:
    """Alpaca: instruction (+ input) → output, optional system and history of [query, answer] pairs."""
    rec = _obj(value, where)
    _read_fields(rec, _ALPACA, where)
    msgs: list[Message] = []
    if system := _str(rec, "system", where, "", required=False):
        msgs.append(Message("system", system))
    history = rec.get("history")
    history = [] if history is None or history == "" else history
    if not isinstance(history, list):
        raise where.error("expected a list of [query, answer] pairs", "history")
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise where.error("expected a [query, answer] pair of strings", f"history[{i}]")
        msgs += [Message("user", turn[0]), Message("assistant", turn[1])]
    instruction = _str(rec, "instruction", where, "")
    extra = _str(rec, "input", where, "", required=False)
    msgs.append(Message("user", f"{instruction}\n{extra}" if extra else instruction))
    output = _str(rec, "output", where, "", required=where.require_target)
    if output is not None:
        msgs.append(Message("assistant", output))
    return validate_conversation(Conversation(msgs), where, "output")


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "observation", "function_call": "function_call"}  # fmt: skip


@FORMATS.register("sharegpt")
def _sharegpt(value: Any, where: Where) -> Conversation:
    """ShareGPT: `conversations` of {from, value}, incl. function_call / observation turns; `system`, `tools`."""
    rec = _obj(value, where)
    _read_fields(rec, _SHAREGPT_RECORD, where)
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        raise where.error("expected a list of turns", "conversations")
    msgs: list[Message] = []
    if system := _str(rec, "system", where, "", required=False):
        msgs.append(Message("system", system))
    for i, t in enumerate(turns):
        p = f"conversations[{i}]."
        t = _obj(t, where, p.rstrip("."))
        _read_fields(t, _SHAREGPT_TURN, where, p)
        who = _str(t, "from", where, p)
        role = _SHAREGPT_ROLES.get(who)
        if role is None:
            known = ", ".join(_SHAREGPT_ROLES)
            raise where.error(f"unknown speaker {_short(who)} (expected one of {known})", f"{p}from")
        text = _str(t, "value", where, p)
        reasoning = _reasoning(t, where, p, role in ("assistant", "function_call"))
        if role == "function_call":
            call = _arguments(text, where, f"{p}value")
            name = call.get("name")
            if not isinstance(name, str):
                raise where.error("a function_call needs a string 'name'", f"{p}value")
            args = _arguments(call.get("arguments"), where, f"{p}value.arguments")
            call = ToolCall(name, args)
            msgs.append(Message("assistant", "", metadata=name, tool_call=call, reasoning=reasoning))
        else:
            msgs.append(Message(role, text or "", reasoning=reasoning))
    return validate_conversation(Conversation(msgs, _tools(rec, "tools", where)), where)


@FORMATS.register("openai")
def _openai(value: Any, where: Where) -> Conversation:
    """OpenAI chat: `messages` with system/user/assistant (incl. `tool_calls`) and `tool` roles; `tools`."""
    rec = _obj(value, where)
    _read_fields(rec, _OPENAI_RECORD, where)
    raw = rec.get("messages")
    if not isinstance(raw, list):
        raise where.error("expected a list of messages", "messages")
    msgs: list[Message] = []
    call_names: dict[str, str] = {}
    for i, m in enumerate(raw):
        p = f"messages[{i}]."
        m = _obj(m, where, p.rstrip("."))
        _read_fields(m, _OPENAI_MESSAGE, where, p)
        role = _str(m, "role", where, p)
        loss = _loss(m, where, p)
        reasoning = _reasoning(m, where, p, role == "assistant")
        if role == "tool":
            call_id = _str(m, "tool_call_id", where, p, required=False)
            name = _str(m, "name", where, p, required=False) or call_names.get(call_id or "")
            if m.get("content") is None:  # else "null" would be trained as the tool's answer
                raise where.error("missing", f"{p}content")
            msgs.append(Message("observation", observation_text(m["content"]), tool_name=name))
        elif role == "assistant" and m.get("tool_calls"):
            if content := _str(m, "content", where, p, required=False):
                msgs.append(Message("assistant", content, loss, reasoning=reasoning))
                reasoning = ""  # written once, before the content and the calls that follow it
            if not isinstance(m["tool_calls"], list):
                raise where.error("expected a list", f"{p}tool_calls")
            for j, call in enumerate(m["tool_calls"]):
                fn = _obj(
                    _obj(call, where, f"{p}tool_calls[{j}]").get("function"),
                    where,
                    f"{p}tool_calls[{j}].function",
                )
                name = _str(fn, "name", where, f"{p}tool_calls[{j}].function.")
                args = _arguments(fn.get("arguments"), where, f"{p}tool_calls[{j}].function.arguments")
                call_names[str(call.get("id", ""))] = name
                call = ToolCall(name, args)
                msgs.append(
                    Message("assistant", "", loss, metadata=name, tool_call=call, reasoning=reasoning)
                )
                reasoning = ""
        elif role in ("system", "user", "assistant"):
            msgs.append(Message(role, _str(m, "content", where, p) or "", loss, reasoning=reasoning))
        else:
            raise where.error(
                f"unknown role {_short(role)} (expected system, user, assistant or tool)", f"{p}role"
            )
    return validate_conversation(Conversation(msgs, _tools(rec, "tools", where)), where, "messages")


# ---------------------------------------------------------------- detection and reading


def detect_format(value: Any, where: Where) -> str:
    """The format a record is in, from its fields."""
    rec = _obj(value, where)
    if isinstance(rec.get("conversations"), list):
        first = next((m for m in rec["conversations"] if isinstance(m, dict)), {})
        return "sharegpt" if "from" in first else "conversations"
    signatures = [
        ("messages", "openai"),
        ("instruction", "alpaca"),
        ("prompt", "prompt_response"),
        ("context", "context_target"),
    ]
    for key, name in signatures:
        if key in rec:
            return name
    if "content" in rec and "summary" in rec:
        raise where.error(
            "this looks like AdvertiseGen (content/summary): convert it first with "
            "`chattune data convert advertise-gen FILE -o OUT.jsonl`"
        )
    fields = ", ".join(sorted(rec)) or "none"
    raise where.error(
        f"cannot tell the data format from the fields ({fields}); expected one of: conversations, "
        "messages, instruction/output, prompt/response, context/target — or set `format:` explicitly"
    )


def read_samples(
    path: str | Path,
    format: str = "auto",
    on_bad_record: str = "error",
    report: ReadReport | None = None,
    allow_untrained: bool = False,
    strict_fields: bool = False,
) -> Iterator[tuple[SourceRecord, Sample]]:
    """Stream canonical samples from a file; bad records raise or, with `on_bad_record: skip`, are counted.

    `allow_untrained` accepts records with nothing to learn (inference inputs that end at a question).
    Fields the format does not read are counted in `report` (`strict_fields`: a bad record instead).
    """
    if on_bad_record not in ("error", "skip"):
        raise ConfigError(f"on_bad_record must be 'error' or 'skip', not {on_bad_record!r}")
    report = report if report is not None else ReadReport()
    fmt = None if format == "auto" else format
    normalise = FORMATS.get(fmt) if fmt else None
    for item in iter_records(path):
        report.read += 1
        try:
            if isinstance(item, DataFormatError):
                raise item
            where = Where(item, not allow_untrained, report, strict_fields)
            if normalise is None:  # auto: the first readable record decides for the whole file
                fmt = detect_format(item.value, where)
                normalise = FORMATS.get(fmt)
            sample = normalise(item.value, where)
        except DataFormatError as e:
            if on_bad_record == "error":
                raise
            report.skip(e)
            continue
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
        yield item, sample
    if report.read == 0:  # an empty file is a wrong path or a failed export, never a data set
        raise DataFormatError("the file holds no records (it is empty)", file=str(path))


# ---------------------------------------------------------------- back to JSON


def message_to_record(messages: list[Message], i: int) -> tuple[dict[str, Any], int]:
    """The canonical JSON of message i (a tool call absorbs the observation after it); returns the next index."""
    m = messages[i]
    if m.tool_call is not None:
        out: dict[str, Any] = {"role": "tool", "name": m.tool_call.name, "parameters": m.tool_call.arguments}
        if m.reasoning:
            out["reasoning"] = m.reasoning
        if m.loss is not None:
            out["loss"] = m.loss
        if i + 1 < len(messages) and messages[i + 1].role == "observation":
            out["observation"] = messages[i + 1].content
            return out, i + 2
        return out, i + 1
    out = {"role": m.role, "content": m.content}
    if m.reasoning:
        out["reasoning"] = m.reasoning
    if m.metadata:
        out["metadata"] = m.metadata
    if m.loss is not None:
        out["loss"] = m.loss
    return out, i + 1


def sample_to_record(sample: Sample) -> dict[str, Any]:
    """The canonical JSON record of a sample (`conversations` + `tools`, or `prompt`/`response`)."""
    if isinstance(sample, Pair):
        return {"prompt": sample.prompt, "response": sample.response}
    msgs, i = [], 0
    while i < len(sample.messages):
        rec, i = message_to_record(sample.messages, i)
        msgs.append(rec)
    out: dict[str, Any] = {"conversations": msgs}
    if sample.tools:
        out["tools"] = sample.tools
    return out
