"""ChatGLM3's encoding, token for token as the official finetune demo builds it."""

from __future__ import annotations

import ast
import json
from typing import TYPE_CHECKING, Any

from chattune.data.schema import TOOLS_SYSTEM_PREFIX, Conversation, Message, Pair, Sample, ToolCall
from chattune.data.templates.base import (
    IGNORE_INDEX,
    TEMPLATES,
    AnswersOnly,
    Encoded,
    Limits,
    ParsedReply,
    split_pair_budget,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """A call as ChatGLM3 writes it: a fenced Python block `tool_call(k=v, ...)`, keyword literals in order."""
    call = ast.Call(
        func=ast.Name(id="tool_call"),
        args=[],
        keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in arguments.items()],
    )
    return f"```python\n{ast.unparse(call)}\n```"


def parse_tool_call(content: str) -> dict[str, Any]:
    """Keyword arguments of a ```` ```python\ntool_call(k=v)\n``` ```` block; literals only, never executed."""
    code = content.strip().removeprefix("```python").removeprefix("```").removesuffix("```").strip()
    try:
        node = ast.parse(code, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"not a Python call: {e.msg}") from None
    if not isinstance(node, ast.Call) or node.args:
        raise ValueError("expected tool_call(name=value, ...)")
    try:
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    except ValueError as e:
        raise ValueError(f"arguments must be literals: {e}") from None


def tools_system_prompt(tools: list[Any]) -> str:
    """The system text ChatGLM3 puts first when tools are offered."""
    return TOOLS_SYSTEM_PREFIX + json.dumps(tools, indent=4, ensure_ascii=False)


@TEMPLATES.register("chatglm3")
class ChatGLM3Template(AnswersOnly):
    """`[gMASK] sop`, then per message `<|role|>` + metadata line + content, then eos.

    A token is a target when the token before it belongs to a trained message, so each reply's closing role
    token (or the final eos) is learnt as the signal to stop.
    """

    name = "chatglm3"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, limits: Limits):
        self.tok, self.limits = tokenizer, limits
        self.prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]

    def _message_ids(self, m: Message) -> list[int]:
        role = "assistant" if m.role == "assistant" else m.role
        content = format_tool_call(m.tool_call.name, m.tool_call.arguments) if m.tool_call else m.content
        return self.tok.build_single_message(role, m.metadata, content)

    def _conversation_ids(self, conv: Conversation) -> tuple[list[int], list[bool]]:
        ids, mask = list(self.prefix), [False, False]
        messages = list(conv.messages)
        if conv.tools:
            messages.insert(0, Message("system", tools_system_prompt(conv.tools)))
        for m in messages:
            piece = self._message_ids(m)
            ids += piece
            mask += [m.trained] * len(piece)
        return ids, mask

    def encode(self, sample: Sample) -> list[Encoded]:
        """Training ids and labels, identical to the official ChatGLM3 finetune demo (always one sample)."""
        if isinstance(sample, Pair):
            return [self._encode_pair(sample)]
        ids, mask = self._conversation_ids(sample)
        ids.append(self.tok.eos_token_id)
        # shift: the label at position i is learnt when position i-1 belongs to a trained message
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, [False, *mask], strict=True)]
        n = self.limits.max_seq_len
        return [Encoded(ids[:n], labels[:n], truncated=len(ids) > n)]

    def _encode_pair(self, sample: Pair) -> Encoded:
        src, tgt, truncated = split_pair_budget(sample, self._plain, self.limits, len(self.prefix))
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        ids = self.prefix + src + tgt + [eos]
        # the demo marks padding by the pad id, so a target token equal to it (unk) is not learnt either
        labels = [IGNORE_INDEX] * (len(self.prefix) + len(src)) + [
            t if t != pad else IGNORE_INDEX for t in tgt
        ]
        return Encoded(ids, [*labels, eos], truncated)

    def _plain(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_prompt(self, sample: Sample) -> list[int]:
        """Generation input: the prompt after `[gMASK] sop`, or the conversation then `<|assistant|>`."""
        if isinstance(sample, Pair):
            src, _, _ = split_pair_budget(Pair(sample.prompt, ""), self._plain, self.limits, len(self.prefix))
            return self.prefix + src
        ids, _ = self._conversation_ids(sample)
        return [*ids, self.tok.get_command("<|assistant|>")]

    def parse_reply(self, text: str, final: bool = True) -> ParsedReply:
        """ChatGLM3 replies start with a metadata line: empty for text, the tool name for a call."""
        metadata, _, content = text.partition("\n")
        if not metadata.strip():
            return ParsedReply(content.strip())
        name = metadata.strip()
        try:
            return ParsedReply("", [ToolCall(name, parse_tool_call(content))])
        except ValueError as e:
            return ParsedReply(text.strip(), error=f"malformed call to {name}: {e}")

    def stop_token_ids(self) -> list[int]:
        """eos, and the role tokens that hand the turn back to the user or a tool."""
        return [
            self.tok.eos_token_id,
            self.tok.get_command("<|user|>"),
            self.tok.get_command("<|observation|>"),
        ]
