"""Where each trained reply sits in a chat template's text: after the exact prompt inference renders for it.

For assistant turn i, inference prompts the model with `messages[:i]` rendered with the generation prompt;
the reply is what the template writes after that prompt when it renders `messages[:i+1]`, through the
end-of-turn token(s). Most templates render a conversation as the concatenation of those prompts and replies,
so one sample holds every turn. Some do not: Qwen3 drops earlier turns' reasoning blocks, Phi-3.5 writes eos
only after the last turn, gpt-oss closes the last turn with `<|return|>` and earlier ones with `<|end|>`.
A turn whose prompt + reply is not a prefix of the whole rendering then becomes a sample of its own, so
every trained reply is learnt after exactly the prompt it will be generated from.

This module works on text only; `hf.py` renders and tokenises.
"""

from __future__ import annotations

from dataclasses import dataclass

from chattune.errors import ConfigError

# Reasoning models whose generation prompt opens a reasoning block (DeepSeek-R1's `<think>\n`) while their
# template renders past replies without one (nor their reasoning). The reply writes the reasoning, or nothing,
# and closes the block, as these models do themselves (Qwen3 and DeepSeek-R1 share the layout).
REASONING_CLOSE = {"<think>": "\n</think>\n\n"}


@dataclass(frozen=True)
class Turn:
    """One trained reply: the prompt inference renders before it, and the reply text through end-of-turn."""

    prompt: str
    reply: str
    reasoning: tuple[int, int] | None = None  # where the reasoning trace sits in `reply`

    @property
    def text(self) -> str:
        """The prompt followed by the reply."""
        return self.prompt + self.reply

    @property
    def end(self) -> int:
        """Where the reply ends in `text`."""
        return len(self.prompt) + len(self.reply)

    def starts(self, text: str) -> bool:
        """Whether `text` begins with this turn's prompt and reply (without building their concatenation)."""
        return text.startswith(self.prompt) and text.startswith(self.reply, len(self.prompt))

    @property
    def reasoning_span(self) -> tuple[int, int] | None:
        """Where the reasoning trace sits in `text`."""
        if self.reasoning is None:
            return None
        a, b = self.reasoning
        return len(self.prompt) + a, len(self.prompt) + b


def reply_after(prompt: str, full: str, history: str, template_name: str, reasoning: str = "") -> str:
    """What the template writes after `prompt` for the turn that `full` ends with (not yet cut at its end).

    `history` is the conversation before the turn rendered without a generation prompt: where the
    generation prompt opens a reasoning block that the rendered turn lacks, the reply writes the turn's
    `reasoning` (if any) and closes the block first.
    """
    if full.startswith(prompt):
        return full[len(prompt) :]
    if prompt.startswith(history) and full.startswith(history):
        opened, rendered = prompt[len(history) :], full[len(history) :]
        for opener, close in REASONING_CLOSE.items():
            head = opened[: opened.rfind(opener)] if opened.rstrip().endswith(opener) else None
            if head is not None and rendered.startswith(head):
                return reasoning.strip("\n") + close + rendered[len(head) :]
    raise ConfigError(
        f"the chat template of {template_name} prompts a reply with {prompt[-40:]!r} but renders that turn as "
        f"{full[len(history) : len(history) + 60]!r}: the reply cannot be placed after the prompt inference "
        "uses; use template: raw, or a chat template whose generation prompt starts the rendered turn"
    )


def cut_at_turn_end(reply: str, ends: tuple[str, ...], specials: tuple[str, ...], eos: str | None) -> str:
    """The reply through its end-of-turn marker; layout after it (newlines, a trailing eos) is not learnt.

    `ends`: the end-of-turn sequences the template closes replies with (earliest match wins). Without one,
    the reply's own trailing special tokens end it; a template that ends turns with none gets `eos`
    appended, so the model still learns to stop.
    """
    cut = min((i + len(e) for e in ends if (i := reply.find(e)) >= 0), default=None)
    if cut is not None:
        return reply[:cut]
    stripped = reply.rstrip()
    if stripped.endswith(specials) or eos is None:
        return stripped
    return stripped + eos


def find_reasoning(reply: str, reasoning: str) -> tuple[int, int] | None:
    """Where `reasoning` (as templates write it: surrounding newlines stripped) sits in `reply`, if it does."""
    trace = reasoning.strip()
    start = reply.find(trace) if trace else -1
    return (start, start + len(trace)) if start >= 0 else None


def trained_spans(turn: Turn, train_reasoning: bool) -> list[tuple[int, int]]:
    """The character spans of `turn.text` that are learnt: the reply, less its reasoning if that is not."""
    start, end = len(turn.prompt), turn.end
    if turn.reasoning_span is None or train_reasoning:
        return [(start, end)]
    a, b = turn.reasoning_span
    return [(start, a), (b, end)]


def group_turns(text: str, turns: list[Turn]) -> list[tuple[str, list[Turn]]]:
    """Samples as (text, the turns trained in it): one sample when the whole rendering holds every turn,
    else the turns it holds stay in it and each other turn becomes a sample of its own, in turn order."""
    held = [t.starts(text) for t in turns]
    if all(held):
        return [(text, turns)]
    own = [(t.text, [t]) for t, h in zip(turns, held, strict=True) if not h]
    whole = [(text, [t for t, h in zip(turns, held, strict=True) if h])] if any(held) else []
    # the whole rendering holds the last turns (the template re-renders earlier ones), so it goes last
    return own + whole
