"""`chattune chat`: a multi-turn REPL in the terminal, streaming replies, with tool calls answered by hand."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.json import JSON
from rich.markup import escape
from rich.text import Text

from chattune.data.schema import Conversation, Message
from chattune.data.templates import ParsedReply, split_reasoning
from chattune.errors import ConfigError
from chattune.infer.engine import Engine
from chattune.infer.generate import Sampling, stream

EXIT_WORDS = ("exit", "quit")
CLEAR_WORD = "clear"
_ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


def load_tools(path: Path) -> list[dict[str, Any]]:
    """Tool definitions from a JSON file: a list of objects, as in the training data's `tools` field."""
    path = Path(path)
    try:
        return parse_tools(path.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise ConfigError(f"tools file {path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"tools file {path}: {e}") from None


def parse_tools(text: str) -> list[dict[str, Any]]:
    """Tool definitions from JSON text: a non-empty list of objects, each with a unique name; else ValueError."""
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"the tools are not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    if not isinstance(tools, list) or not tools:
        got = "an empty list" if tools == [] else f"a JSON {type(tools).__name__}"
        raise ValueError(f"the tools must be a non-empty JSON list of tool definitions, not {got}")
    seen = set()
    for i, tool in enumerate(tools, start=1):
        if not isinstance(tool, dict):
            raise ValueError(
                f"tool {i} is a JSON {type(tool).__name__}; each tool must be an object such as "
                '{"name": "get_weather", "parameters": {...}}'
            )
        function = tool.get("function")
        name = tool.get("name") or (function.get("name") if isinstance(function, dict) else None)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f'tool {i} has no name: add "name": "..." (or "function": {{"name": ...}})')
        if name in seen:
            raise ValueError(
                f"tool {i}: the name {name!r} is used twice; the model could not tell them apart"
            )
        seen.add(name)
    return tools


def reply_messages(parsed: ParsedReply) -> list[Message]:
    """The history entries for a parsed reply: one text message, or one tool-call message per call."""
    # the reasoning goes into history with the reply: the chat template decides whether to show it again
    if parsed.error or not parsed.tool_calls:  # a malformed call stays in history as the text it was
        return [Message("assistant", parsed.content, reasoning=parsed.reasoning)]
    return [
        Message(
            "assistant",
            parsed.content if i == 0 else "",
            metadata=call.name,
            tool_call=call,
            reasoning=parsed.reasoning if i == 0 else "",
        )
        for i, call in enumerate(parsed.tool_calls)
    ]


def render_reply(parsed: ParsedReply, console: Console, *, streamed: bool = True) -> None:
    """Show what a reply means: its text (unless already streamed), each tool call, or a parse warning."""
    if parsed.error:
        if not streamed:
            console.print(parsed.content, markup=False, highlight=False)
        console.print(
            f"[yellow]warning: the reply looks like a tool call but does not parse ({escape(parsed.error)}); "
            "it is kept as plain text[/]",
            highlight=False,
        )
        return
    if parsed.reasoning and not streamed:
        console.print(parsed.reasoning, style="dim", markup=False, highlight=False)
    if parsed.content and not streamed:
        console.print(parsed.content, markup=False, highlight=False)
    for call in parsed.tool_calls:
        console.print(Text.assemble(("tool call: ", "bold magenta"), (call.name, "bold")))
        console.print(JSON.from_data(call.arguments, indent=2, ensure_ascii=False))


def token_line(prompt_tokens: int, reply_tokens: int, context_length: int) -> str:
    """The token budget after a reply, e.g. `tokens: prompt 120 + reply 14 = 134 of 512 context`."""
    used = prompt_tokens + reply_tokens
    return f"tokens: prompt {prompt_tokens} + reply {reply_tokens} = {used} of {context_length} context"


def _tool_name(tool: dict[str, Any]) -> str:
    """A definition's name, ChatGLM3-style (`name`) or OpenAI-style (`function.name`)."""
    function = tool.get("function")
    return str(tool.get("name") or (function.get("name") if isinstance(function, dict) else None) or "?")


def _terminal_prompt(console: Console, prompt: Text) -> str:
    """The styled prompt as a string for input(), colour codes fenced so readline knows they take no room."""
    with console.capture() as captured:
        console.print(prompt, end="")
    text = captured.get()
    if "readline" not in sys.modules:
        return text
    # unfenced escape codes count as columns, and line editing or history recall then redraws over the prompt
    return _ANSI_CODE.sub(lambda m: f"\x01{m.group(0)}\x02", text)


def _read(console: Console, prompt: Text, input_stream: TextIO) -> str | None:
    """One line from the user without its newline; None at end of input."""
    if input_stream is sys.stdin:
        try:
            if console.file is sys.stdout:  # input() must draw the prompt itself for readline to redraw it
                return input(_terminal_prompt(console, prompt))
            return console.input(prompt)
        except EOFError:
            console.print()
            return None
    console.print(prompt, end="")
    line = input_stream.readline()
    if not line:
        console.print()
        return None
    line = line.rstrip("\n")
    console.print(line, markup=False, highlight=False)  # echo, so a piped session reads as a transcript
    return line


class ShownSoFar:
    """What of a streamed reply is on screen: its reasoning (shown dimmed) and its answer, as they grow."""

    def __init__(self, tags: tuple[str, str, bool]):
        self.tags, self.reasoning, self.answer = tags, "", ""

    def more(self, raw: str) -> list[tuple[str, bool]]:
        """The new (text, is_reasoning) pieces to print now that the reply reads `raw`."""
        reasoning, answer = split_reasoning(raw, self.tags, final=False)
        # ChatGLM3 text replies open with an empty metadata line, reasoning ends with layout: not printed
        answer = answer.lstrip()
        out = []
        if reasoning.startswith(self.reasoning) and len(reasoning) > len(self.reasoning):
            out.append((reasoning[len(self.reasoning) :], True))
            self.reasoning = reasoning
        if answer.startswith(self.answer) and len(answer) > len(self.answer):
            if self.reasoning and not self.answer:
                out.append(("\n", False))
            out.append((answer[len(self.answer) :], False))
            self.answer = answer
        return out


def _reply(engine: Engine, conv: Conversation, sampling: Sampling, console: Console) -> ParsedReply:
    """Stream one assistant reply to the console, then parse it, show it and add it to the history."""
    prompt_ids = engine.template.encode_prompt(conv)
    context = engine.context_length
    if len(prompt_ids) + sampling.max_new_tokens > context:
        console.print(
            f"[yellow]{len(prompt_ids)} prompt tokens + up to {sampling.max_new_tokens} new ones exceed the "
            f"model's {context}-token context; the reply may degrade (type clear to start over)[/]",
            highlight=False,
        )
    console.print(Text("assistant> ", style="bold cyan"), end="")
    raw = ""  # unstripped: ChatGLM3's parser needs the metadata line as generated
    shown = ShownSoFar(engine.template.reasoning_tags())
    cancel = threading.Event()
    threads_before = set(threading.enumerate())
    try:
        for piece in stream(engine, prompt_ids, sampling, cancel):
            raw += piece
            for text, dim in shown.more(raw):
                console.print(
                    text, end="", style="dim" if dim else None, markup=False, highlight=False, soft_wrap=True
                )
    except KeyboardInterrupt:
        # Ctrl-C quits: stop generation at its next token and wait for its thread, since interpreter exit
        # in the middle of a torch op aborts the process ("terminate called without an active exception")
        cancel.set()
        for worker in set(threading.enumerate()) - threads_before:
            worker.join(timeout=30)
        raise
    console.print()
    parsed = engine.template.parse_reply(raw)
    render_reply(parsed, console, streamed=True)
    conv.messages.extend(reply_messages(parsed))
    # the streamer yields text, so the reply is counted by re-encoding it (stop token excluded)
    reply_tokens = len(engine.tokenizer.encode(raw, add_special_tokens=False))
    console.print(token_line(len(prompt_ids), reply_tokens, context), style="dim", highlight=False)
    return parsed


def _answer(
    engine: Engine, conv: Conversation, sampling: Sampling, console: Console, input_stream: TextIO
) -> bool:
    """Reply to the last user turn, asking the user for each tool's result until the model answers in text.

    Returns False when input ended while an observation was awaited.
    """
    while True:
        parsed = _reply(engine, conv, sampling, console)
        if parsed.error or not parsed.tool_calls:
            return True
        for call in parsed.tool_calls:
            observation = _read(
                console, Text(f"observation for {call.name}> ", style="bold yellow"), input_stream
            )
            if observation is None:
                return False
            conv.messages.append(Message("observation", observation, tool_name=call.name))


def run_chat(
    engine: Engine,
    sampling: Sampling,
    *,
    system: str | None = None,
    tools_file: Path | None = None,
    input_stream: TextIO = sys.stdin,
    console: Console,
) -> None:
    """Chat until exit/quit, end of input or Ctrl-C; `clear` forgets the turns but keeps system and tools."""
    if engine.template.name == "raw":
        raise ConfigError(
            f"{engine.name} uses template 'raw' (prompt/response data, no roles), which cannot encode a "
            "conversation; chat needs template hf or chatglm3 (use `chattune infer --prompt` for raw models)"
        )
    tools = load_tools(tools_file) if tools_file is not None else None
    start = [Message("system", system)] if system else []
    conv = Conversation(list(start), tools)
    if input_stream is sys.stdin and sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # not on every platform; plain input() still works
            import readline  # noqa: F401  (line editing and history for input())
    tool_names = ", ".join(_tool_name(t) for t in tools) if tools else "none"
    console.print(
        f"[bold]{escape(engine.name)}[/] (template {engine.template.name}; tools: {escape(tool_names)})\n"
        "[dim]type a message; 'clear' starts over, 'exit' or Ctrl-D quits[/]"
    )
    try:
        while True:
            line = _read(console, Text("you> ", style="bold green"), input_stream)
            if line is None:
                break
            word = line.strip().lower()
            if not word:
                continue
            if word in EXIT_WORDS:
                break
            if word == CLEAR_WORD:
                conv.messages = list(start)
                console.print("[dim]history cleared[/]")
                continue
            conv.messages.append(Message("user", line))
            if not _answer(engine, conv, sampling, console, input_stream):
                break
    except KeyboardInterrupt:  # Ctrl-C quits like exit, at the prompt or mid-reply
        console.print()
    console.print("[dim]bye[/]")
