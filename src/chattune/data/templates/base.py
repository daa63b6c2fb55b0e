"""What every template provides, the registry, and `template: auto`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from chattune.data.schema import Pair, Sample, ToolCall
from chattune.errors import ConfigError
from chattune.limits import Limits
from chattune.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass
class ParsedReply:
    """A generated reply split into text and tool calls; `error` says why a call-looking reply did not parse."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None
    reasoning: str = ""  # the reasoning trace written before the answer, where the template has one

    def display(self) -> str:
        """The reply as a person reads it: the text, or the calls as name(arguments)."""
        calls = [f"{c.name}({json.dumps(c.arguments, ensure_ascii=False)})" for c in self.tool_calls]
        return "\n".join(x for x in [self.content, *calls] if x)


@dataclass
class Encoded:
    """One tokenised sample; labels are aligned with input_ids (the model shifts), untrained = -100."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    # on the first sample of a record that became several (one per trained turn): (samples, extra tokens)
    split: tuple[int, int] | None = None
    reasoning: list[int] = field(
        default_factory=list
    )  # token ranges of reasoning traces: [lo, hi, lo, hi...]

    @property
    def n_trained(self) -> int:
        """How many positions carry a label."""
        return len(self.labels) - self.labels.count(IGNORE_INDEX)  # list.count runs in C


def split_reasoning(text: str, tags: tuple[str, str, bool], final: bool = True) -> tuple[str, str]:
    """(reasoning, answer) of generated text, for a template that writes reasoning between `tags`.

    `tags` is (opening tag, closing tag, whether the generation prompt already opened it). A reply that
    stops before the closing tag is all reasoning. Mid-stream (`final` false) a tail that may begin the
    closing tag, or a start that may begin the opening one, is held back, so what was shown stays valid.
    """
    opener, closer, opened = tags
    if not closer:
        return "", text
    if not final:
        text = text[
            : len(text) - max((k for k in range(1, len(closer)) if text.endswith(closer[:k])), default=0)
        ]
        if opener and not opened and text.strip() and opener.startswith(text.strip()):
            return "", ""  # it may still become the opening tag
    if closer in text:
        reasoning, answer = text.split(closer, 1)
        return reasoning.strip().removeprefix(opener).strip(), answer
    stripped = text.lstrip()
    if opened or (opener and stripped.startswith(opener)):
        return stripped.removeprefix(opener).strip(), ""
    return "", text


class Template(Protocol):
    """Encodes samples for training and prompts for generation, the same way."""

    name: str
    train_reasoning: bool  # false: reasoning traces are context, not targets (the answer alone is learnt)

    def encode(self, sample: Sample) -> list[Encoded]:
        """Training ids and labels for a record: one sample, or one per trained turn where the template
        cannot hold every reply after its inference prompt in one rendering."""
        ...

    def encode_prompt(self, sample: Sample) -> list[int]:
        """Ids the model continues from: a Pair's prompt, or a conversation ready for the next assistant turn."""
        ...

    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generated reply."""
        ...

    def notes(self) -> list[str]:
        """Warnings about how this template trains (e.g. an end-of-turn it had to supply), for the user."""
        ...

    def supports_reasoning(self) -> bool:
        """Whether an assistant turn's reasoning has a place in what this template trains."""
        ...

    def reasoning_tags(self) -> tuple[str, str, bool]:
        """(opening tag, closing tag, whether the generation prompt opens it); empty without reasoning."""
        ...

    def parse_reply(self, text: str, final: bool = True) -> ParsedReply:
        """Split generated text (special tokens removed) into reasoning, content and tool calls, as training
        wrote them; `final` false for a reply still being generated (see `split_reasoning`)."""
        ...


class AnswersOnly:
    """For templates whose replies are answers only (chatglm3, raw): no reasoning, eos always ends a reply."""

    train_reasoning = True  # no reasoning reaches these templates (see supports_reasoning)

    def notes(self) -> list[str]:
        """Nothing to warn about: replies always end with eos."""
        return []

    def supports_reasoning(self) -> bool:
        """No place for reasoning traces: a record with one is refused, never silently cut."""
        return False

    def reasoning_tags(self) -> tuple[str, str, bool]:
        """None: replies are answers only."""
        return "", "", False


TEMPLATES: Registry[type] = Registry("template", ConfigError)


def is_chatglm3_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """ChatGLM3 tokenizers (ours, or THUDM's remote-code one) expose these two methods."""
    return hasattr(tokenizer, "build_single_message") and hasattr(tokenizer, "get_command")


def resolve_template_name(name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """`auto` → chatglm3 for ChatGLM3 tokenizers, hf when a chat template exists, raw otherwise."""
    if name != "auto":
        TEMPLATES.get(name)
        return name
    if is_chatglm3_tokenizer(tokenizer):
        return "chatglm3"
    return "hf" if getattr(tokenizer, "chat_template", None) else "raw"


def build_template(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    limits: Limits | None = None,
    *,
    train_reasoning: bool = True,
) -> Template:
    """The template called `name` (or the one `auto` picks) bound to a tokenizer and length limits.

    `train_reasoning`: whether assistant turns' reasoning traces are learnt (else only seen as context).
    """
    resolved = resolve_template_name(name, tokenizer)
    template = TEMPLATES.get(resolved)(tokenizer, limits or Limits())
    template.train_reasoning = train_reasoning
    return template


def split_pair_budget(
    sample: Pair, encode: Any, limits: Limits, prefix_len: int
) -> tuple[list[int], list[int], bool]:
    """Source and target ids cut to max_source_len (prefix tokens included) and max_target_len."""
    src = encode(sample.prompt)
    tgt = encode(sample.response)
    keep_src = max(limits.max_source_len - prefix_len, 0)
    truncated = len(src) > keep_src or len(tgt) > limits.max_target_len
    return src[:keep_src], tgt[: limits.max_target_len], truncated
