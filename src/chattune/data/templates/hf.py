"""Any tokenizer's own chat template, with masks derived from rendering prefixes (no per-model rules)."""

from __future__ import annotations

import itertools
from typing import Any

from chattune.data.schema import Conversation, Message, Sample
from chattune.data.templates.base import IGNORE_INDEX, TEMPLATES, Encoded, Limits
from chattune.data.templates.raw import RawTemplate
from chattune.errors import ConfigError


def to_hf_messages(conv: Conversation) -> list[dict[str, Any]]:
    """Canonical messages in the shape `apply_chat_template` expects (OpenAI-style tool calls and results)."""
    out: list[dict[str, Any]] = []
    for m in conv.messages:
        if m.tool_call is not None:
            call = {
                "type": "function",
                "function": {"name": m.tool_call.name, "arguments": m.tool_call.arguments},
            }
            out.append({"role": "assistant", "content": m.content, "tool_calls": [call]})
        elif m.role == "observation":
            out.append(
                {"role": "tool", "content": m.content, **({"name": m.tool_name} if m.tool_name else {})}
            )
        else:
            out.append({"role": m.role, "content": m.content})
    return out


@TEMPLATES.register("hf")
class HFChatTemplate:
    """Renders with the tokenizer's chat template; learns each trained assistant turn and its end-of-turn marker.

    For trained turn i, the text of messages[:i] with a generation prompt is a prefix of the text of
    messages[:i+1]; the characters between them are the reply (content, end-of-turn token, and any trailing
    whitespace, which is not learnt). Input-output data falls back to the raw encoding.
    """

    name = "hf"

    def __init__(self, tokenizer: Any, limits: Limits):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"the tokenizer of {tokenizer.name_or_path} has no chat template; use template: raw"
            )
        self.tok, self.limits = tokenizer, limits
        self.raw = RawTemplate(tokenizer, limits)

    def _render(self, conv: Conversation, messages: list[dict[str, Any]], generation: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tools=conv.tools, tokenize=False, add_generation_prompt=generation
        )

    def trained_spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans that are learnt."""
        msgs = to_hf_messages(conv)
        text = self._render(conv, msgs, False)
        spans = []
        for i, m in enumerate(conv.messages):
            if not m.trained:
                continue
            before = self._render(conv, msgs[:i], True) if i else ""
            upto = self._render(conv, msgs[: i + 1], False)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ConfigError(
                    f"the chat template of {self.tok.name_or_path} renders a conversation differently from its "
                    "prefixes, so reply masks cannot be derived safely; use a template that renders prefixes "
                    "stably, or template: chatglm3/raw"
                )
            end = len(upto.rstrip()) if self._ends_turn(upto) else len(upto)
            spans.append((len(before), end))
        return text, spans

    def _ends_turn(self, text: str) -> bool:
        # trailing whitespace after an end-of-turn token is layout, not something to learn
        stripped = text.rstrip()
        return any(stripped.endswith(t) for t in self.tok.all_special_tokens if t)

    def encode(self, sample: Sample) -> Encoded:
        """Ids and labels; every token that starts inside a learnt span is a target."""
        if not isinstance(sample, Conversation):
            return self.raw.encode(sample)
        text, spans = self.trained_spans(sample)
        ids, starts = self._tokenize(text, spans)
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for j, start in enumerate(starts):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k < len(spans) and spans[k][0] <= start < spans[k][1]:
                labels[j] = ids[j]
        n = self.limits.max_seq_len
        return Encoded(ids[:n], labels[:n], truncated=len(ids) > n)

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Token ids and each token's start character (fast tokenizers give offsets directly)."""
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            return enc["input_ids"], [s for s, _ in enc["offset_mapping"]]
        # slow tokenizers: encode the text piecewise at span boundaries so no token straddles one
        cuts = sorted({0, len(text), *[c for span in spans for c in span]})
        ids, starts = [], []
        for a, b in itertools.pairwise(cuts):
            piece = self.tok.encode(text[a:b], add_special_tokens=False)
            ids += piece
            starts += [a] * len(piece)
        return ids, starts

    def encode_prompt(self, sample: Sample) -> list[int]:
        """The conversation rendered with the generation prompt, tokenised as in training."""
        if not isinstance(sample, Conversation):
            return self.raw.encode_prompt(sample)
        text = self._render(sample, to_hf_messages(sample), True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def stop_token_ids(self) -> list[int]:
        """eos plus the end-of-turn token this template closes a reply with (found by encoding a probe)."""
        probe = Conversation([Message("user", "Hi"), Message("assistant", "Hello")])
        learnt = [t for t in self.encode(probe).labels if t != IGNORE_INDEX]
        ids = {self.tok.eos_token_id}
        if learnt and learnt[-1] in self.tok.all_special_ids:
            ids.add(learnt[-1])
        return sorted(i for i in ids if i is not None)
