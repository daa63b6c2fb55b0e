"""Any tokenizer's own chat template, with masks derived from rendering prefixes (no per-model rules)."""

from __future__ import annotations

import bisect
import itertools
import json
import re
from typing import TYPE_CHECKING, Any

from chattune.data.schema import Conversation, Message, Sample, ToolCall
from chattune.data.templates.base import (
    IGNORE_INDEX,
    TEMPLATES,
    Encoded,
    Limits,
    ParsedReply,
    split_reasoning,
)
from chattune.data.templates.chatglm3 import tools_system_prompt
from chattune.data.templates.raw import RawTemplate
from chattune.data.templates.turns import (
    Turn,
    cut_at_turn_end,
    find_reasoning,
    group_turns,
    reply_after,
    trained_spans,
)
from chattune.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def format_tool_call_text(call: ToolCall) -> str:
    """A call written into the reply text, for chat templates that cannot render `tool_calls` themselves."""
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def to_hf_messages(
    conv: Conversation, native_tools: bool = True, native_calls: bool = True
) -> list[dict[str, Any]]:
    """Canonical messages in the shape `apply_chat_template` expects (OpenAI-style tool calls and results).

    Where the template ignores tool definitions or tool calls, they go into the text instead (definitions as
    ChatGLM3's tools system prompt, calls as `<tool_call>` JSON), so the model still sees what it learns from.
    """
    out: list[dict[str, Any]] = []
    for m in conv.messages:
        # Qwen3, DeepSeek and GLM templates read `reasoning_content`, gpt-oss and LFM2.5 read `thinking`
        thought = {"reasoning_content": m.reasoning, "thinking": m.reasoning} if m.reasoning else {}
        if m.tool_call is not None and native_calls:
            call = {
                "type": "function",
                "function": {"name": m.tool_call.name, "arguments": m.tool_call.arguments},
            }
            out.append({"role": "assistant", "content": m.content, "tool_calls": [call], **thought})
        elif m.tool_call is not None:
            text = "\n".join(x for x in (m.content, format_tool_call_text(m.tool_call)) if x)
            out.append({"role": "assistant", "content": text, **thought})
        elif m.role == "observation":
            out.append(
                {"role": "tool", "content": m.content, **({"name": m.tool_name} if m.tool_name else {})}
            )
        else:
            out.append({"role": m.role, "content": m.content, **thought})
    if conv.tools and not native_tools:
        tools_text = tools_system_prompt(conv.tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{tools_text}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "system", "content": tools_text})
    return out


def parse_tool_calls_text(text: str) -> ParsedReply:
    """Tool calls in a reply: `<tool_call>` JSON blocks, or a reply that is one JSON call object."""
    calls, errors = [], []
    bodies = _TOOL_CALL_RE.findall(text)
    stripped = text.strip()
    if not bodies and stripped.startswith("{") and '"name"' in stripped:
        bodies = [stripped]
    for body in bodies:
        try:
            obj = json.loads(body)
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(obj.get("name"), str) or not isinstance(args, dict):
                raise ValueError("expected {name, arguments}")
            calls.append(ToolCall(obj["name"], args))
        except (ValueError, AttributeError) as e:
            errors.append(f"malformed tool call {body[:80]!r}: {e}")
    if errors:
        return ParsedReply(stripped, error="; ".join(errors))
    if calls and bodies == [stripped]:
        return ParsedReply("", calls)
    return ParsedReply(_TOOL_CALL_RE.sub("", text).strip(), calls)


@TEMPLATES.register("hf")
class HFChatTemplate:
    """Renders with the tokenizer's chat template; learns each trained assistant turn and its end-of-turn marker.

    For trained turn i, the text of messages[:i] with a generation prompt is a prefix of the text of
    messages[:i+1]; the characters between them are the reply (content, end-of-turn token, and any trailing
    whitespace, which is not learnt). Input-output data falls back to the raw encoding.
    """

    name = "hf"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, limits: Limits):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"the tokenizer of {tokenizer.name_or_path} has no chat template; use template: raw"
            )
        self.tok, self.limits = tokenizer, limits
        self.raw = RawTemplate(tokenizer, limits)
        self.native_tools, self.native_calls = self._probe_tool_support()
        self._stop_ids: list[int] | None = None
        self._ends: tuple[tuple[str, ...], tuple[str, ...], str | None] | None = None
        self._tags: tuple[str, str, bool] | None = None
        self._tags_probed = False
        self.train_reasoning = True
        self._jinja = _DirectRenderer.if_equivalent(tokenizer, self.native_tools, self.native_calls)

    def _probe_tool_support(self) -> tuple[bool, bool]:
        """Whether the chat template renders tool definitions and tool calls itself (checked by rendering)."""
        probe_tool = [{"type": "function", "function": {"name": "zzprobe_tool", "parameters": {}}}]
        user = [{"role": "user", "content": "x"}]
        call = {"type": "function", "function": {"name": "zzprobe_call", "arguments": {}}}
        try:
            tools = "zzprobe_tool" in self.tok.apply_chat_template(user, tools=probe_tool, tokenize=False)
        except Exception:  # templates that reject tools outright
            tools = False
        try:
            msgs = [*user, {"role": "assistant", "content": "", "tool_calls": [call]}]
            calls = "zzprobe_call" in self.tok.apply_chat_template(msgs, tokenize=False)
        except Exception:  # templates that reject tool_calls outright
            calls = False
        return tools, calls

    def hf_messages(self, conv: Conversation) -> list[dict[str, Any]]:
        """The conversation as this template's messages (tools and calls in text where it cannot render them)."""
        return to_hf_messages(conv, self.native_tools, self.native_calls)

    def parse_reply(self, text: str, final: bool = True) -> ParsedReply:
        """Reasoning (where the template writes it in tags), then text and `<tool_call>` (or JSON) calls."""
        reasoning, answer = split_reasoning(text, self.reasoning_tags(), final)
        parsed = parse_tool_calls_text(answer)
        parsed.reasoning = reasoning
        return parsed

    def supports_reasoning(self) -> bool:
        """Whether the chat template writes an assistant turn's reasoning (checked by rendering a probe)."""
        return self._reasoning_probe() is not None

    def reasoning_tags(self) -> tuple[str, str, bool]:
        """(opening tag, closing tag, whether the generation prompt opens it) as the template writes them."""
        return self._reasoning_probe() or ("", "", False)

    def _reasoning_probe(self) -> tuple[str, str, bool] | None:
        if not self._tags_probed:
            self._tags, self._tags_probed = self._probe_reasoning(), True
        return self._tags

    def _probe_reasoning(self) -> tuple[str, str, bool] | None:
        probe = Conversation(
            [Message("user", "Hi"), Message("assistant", "zzprobe answer", reasoning="zzprobe reasoning")]
        )
        try:
            _, [turn] = self.turns(probe)
        except Exception:  # a template that rejects the probe, or drops the reasoning
            return None
        reply = turn.reply
        start, end = reply.find("zzprobe reasoning"), reply.find("zzprobe answer")
        if start < 0 or end < start:
            return None
        opener, closer = reply[:start].strip(), reply[start + len("zzprobe reasoning") : end].strip()
        return opener, closer, not opener and bool(closer)

    def _render(self, conv: Conversation, messages: list[dict[str, Any]], generation: bool) -> str:
        tools = conv.tools if self.native_tools else None
        if self._jinja is not None:
            return self._jinja.render(messages, tools, generation)
        return self.tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation
        )

    def turns(self, conv: Conversation) -> tuple[str, list[Turn]]:
        """The whole rendering and each trained reply with the prompt inference renders before it."""
        msgs = self.hf_messages(conv)
        text = self._render(conv, msgs, False)
        turns = []
        offset = len(msgs) - len(conv.messages)  # 1 when a tools system message was put in front
        ends, specials, eos = self._turn_ends()
        for i, m in enumerate(conv.messages):
            if not m.trained:
                continue
            j = i + offset
            prompt = self._render(conv, msgs[:j], True) if j else ""
            # rendering is most of the encoding time: the last message's rendering is the whole text
            full = text if j + 1 == len(msgs) else self._render(conv, msgs[: j + 1], False)
            history = self._render(conv, msgs[:j], False) if j and not full.startswith(prompt) else ""
            reply = reply_after(prompt, full, history, self.tok.name_or_path, m.reasoning)
            reply = cut_at_turn_end(reply, ends, specials, eos)
            where = find_reasoning(reply, m.reasoning)
            if m.reasoning and where is None:
                raise ConfigError(
                    f"the chat template of {self.tok.name_or_path} does not write the reasoning of "
                    f"assistant turn {i} into the reply it trains; it would be lost"
                )
            turns.append(Turn(prompt, reply, where))
        return text, turns

    def _turn_ends(self) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
        """(end-of-turn sequences, special token strings, eos), found once by rendering probe replies."""
        if self._ends is None:
            self._ends = self._probe_turn_ends()
        return self._ends

    def _probe_turn_ends(self) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
        # special tokens as the tokenizer marks them (added tokens flagged special, and the named ones)
        added = getattr(self.tok, "added_tokens_decoder", {}) or {}
        specials = {t.content for t in added.values() if getattr(t, "special", False)}
        specials |= {t for t in self.tok.all_special_tokens if t}
        specials_by_length = tuple(sorted(specials, key=len, reverse=True))
        eos = self.tok.eos_token
        ends: list[str] = []
        for conv, marker in self._probes():
            msgs = self.hf_messages(conv)
            try:
                prompt, history = (self._render(conv, msgs[:-1], gen) for gen in (True, False))
                reply = reply_after(prompt, self._render(conv, msgs, False), history, self.tok.name_or_path)
            except Exception:  # a template that rejects the probe: the real conversations will say why
                continue
            after = reply[reply.rfind(marker) + len(marker) :] if marker in reply else ""
            end = _first_special_run(after, specials_by_length)
            if end and end not in ends:
                ends.append(end)
        return tuple(ends), specials_by_length, eos

    def notes(self) -> list[str]:
        """What a user should know about how this chat template is trained (printed by data check and train)."""
        ends, _, eos = self._turn_ends()
        if ends:
            return []
        return [
            f"the chat template of {self.tok.name_or_path or 'this tokenizer'} ends replies without a special "
            f"token: eos ({eos}) is appended to every trained reply so the model learns to stop"
        ]

    def _probes(self) -> list[tuple[Conversation, str]]:
        """A plain reply and (where the template renders calls) a tool call, each with a text to find in it."""
        plain = Conversation([Message("user", "Hi"), Message("assistant", "zzprobe reply")])
        probes = [(plain, "zzprobe reply")]
        if self.native_calls:
            call = Message("assistant", "", tool_call=ToolCall("lookup", {"q": "zzprobe"}))
            probes.append((Conversation([Message("user", "Hi"), call]), "zzprobe"))
        return probes

    def encode(self, sample: Sample) -> list[Encoded]:
        """Ids and labels: one sample holding every trained reply, or one per reply where the template
        re-renders earlier turns (see turns.py); every token that starts inside a reply is a target."""
        if not isinstance(sample, Conversation):
            return self.raw.encode(sample)
        text, turns = self.turns(sample)
        groups = group_turns(text, turns)
        encoded = []
        for sample_text, held in groups:
            spans = [s for t in held for s in trained_spans(t, self.train_reasoning)]
            thoughts = [t.reasoning_span for t in held if t.reasoning_span is not None]
            encoded.append(self._encode_text(sample_text, spans, thoughts))
        if len(encoded) > 1:  # what the split costs: tokens beyond the one rendering's
            whole = len(encoded[-1].input_ids) if groups[-1][0] is text else len(self._tokenize(text, [])[0])
            encoded[0].split = (len(encoded), sum(len(e.input_ids) for e in encoded) - whole)
        return encoded

    def _encode_text(
        self, text: str, spans: list[tuple[int, int]], thoughts: list[tuple[int, int]]
    ) -> Encoded:
        """Tokens of `text`; those starting inside `spans` are targets, those inside `thoughts` are reasoning."""
        ids, offsets = self._tokenize(text, [*spans, *thoughts])
        # offsets ascend, so a span's tokens are one slice; (a,) sorts before every (a, end) offset
        first = bisect.bisect_left
        labels = [IGNORE_INDEX] * len(ids)
        for a, b in spans:
            lo, hi = first(offsets, (a,)), first(offsets, (b,))
            labels[lo:hi] = ids[lo:hi]
        n = self.limits.max_seq_len
        reasoning = [min(first(offsets, (c,)), n) for span in thoughts for c in span]
        return Encoded(ids[:n], labels[:n], truncated=len(ids) > n, reasoning=reasoning)

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, ...]]]:
        """Token ids and each token's character offsets, (start, end) or (start,) (ascending either way)."""
        if getattr(self.tok, "is_fast", False):
            # the Rust tokenizer directly: the same ids and offsets without the Python wrapper's per-call cost
            enc = self.tok.backend_tokenizer.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        # slow tokenizers: encode the text piecewise at span boundaries so no token straddles one
        cuts = sorted({0, len(text), *[c for span in spans for c in span]})
        ids: list[int] = []
        offsets: list[tuple[int, ...]] = []
        for a, b in itertools.pairwise(cuts):
            piece = self.tok.encode(text[a:b], add_special_tokens=False)
            ids += piece
            offsets += [(a,)] * len(piece)
        return ids, offsets

    def encode_prompt(self, sample: Sample) -> list[int]:
        """The conversation rendered with the generation prompt, tokenised as in training."""
        if not isinstance(sample, Conversation):
            return self.raw.encode_prompt(sample)
        text = self._render(sample, self.hf_messages(sample), True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def stop_token_ids(self) -> list[int]:
        """eos plus the last token of each end-of-turn sequence the template closes replies with."""
        if self._stop_ids is None:  # asked for on every generate call; the probes render several times
            ends, _, _ = self._turn_ends()
            ids = {self.tok.eos_token_id}
            for end in ends:  # a run like <|END_RESPONSE|><|END_OF_TURN_TOKEN|> is learnt whole
                ids.add(self.tok(end, add_special_tokens=False)["input_ids"][-1])
            self._stop_ids = sorted(i for i in ids if i is not None)
        return list(self._stop_ids)


def _first_special_run(text: str, specials: tuple[str, ...]) -> str:
    """The first run of consecutive special tokens in `text` (longest names first), '' when it has none.

    After a probe reply's content this is the template's end of turn: `<|im_end|>`, `<|eot_id|>`,
    `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`, gpt-oss's `<|call|>` after a tool call.
    """
    found = [i for t in specials if (i := text.find(t)) >= 0]
    if not found:
        return ""
    start = run = min(found)
    while token := next((t for t in specials if text.startswith(t, run)), None):
        run += len(token)
    return text[start:run]


# attributes whose sandbox check always passes: jinja's own loop variables, and str methods that only read
# (str.format and format_map stay with the sandbox, which wraps them)
_LOOP_PROPERTIES = frozenset(
    {
        "first",
        "last",
        "index",
        "index0",
        "revindex",
        "revindex0",
        "length",
        "depth",
        "depth0",
        "previtem",
        "nextitem",
    }
)
_STR_METHODS = frozenset(
    {
        "strip",
        "lstrip",
        "rstrip",
        "split",
        "rsplit",
        "splitlines",
        "startswith",
        "endswith",
        "lower",
        "upper",
        "title",
        "capitalize",
        "replace",
        "find",
        "rfind",
        "count",
        "join",
        "isdigit",
        "isspace",
    }
)


def _quick_lookups(env: Any) -> Any:
    """A private overlay of transformers' sandboxed environment that skips the sandbox's checks for lookups
    that always pass them (`loop.first`, `content.strip`, ...), and sends every other lookup through them.

    The checks took 40% of rendering: every message costs a `loop` lookup or two, each a chain of type
    tests. Rendering stays sandboxed (chat templates are untrusted input): nothing that could fail a check is
    fast-pathed, and the overlay does not touch the environment transformers renders with.
    """
    from jinja2.runtime import LoopContext

    quick = env.overlay()
    checked = quick.getattr

    def getattr_(obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if (kind is LoopContext and attribute in _LOOP_PROPERTIES) or (
            kind is str and attribute in _STR_METHODS
        ):
            return getattr(obj, attribute)
        return checked(obj, attribute)

    quick.getattr = getattr_  # compiled templates call environment.getattr for every `a.b`
    return quick


class _DirectRenderer:
    """The tokenizer's compiled chat template called directly, skipping `apply_chat_template`'s per-call work.

    Encoding renders every conversation several times (once per trained turn's prefix), and the wrapper
    around the Jinja call (normalising and deep-copying messages, looking the template up) cost as much as
    the rendering itself. It is used only when it renders probe conversations exactly as
    `apply_chat_template` does, and never for templates transformers cannot hand out compiled.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, compile_template: Any):
        self.variables = dict(tokenizer.special_tokens_map)
        plain = tokenizer.get_chat_template()
        env = _quick_lookups(compile_template(plain).environment)
        self.plain = env.from_string(plain)
        try:
            self.with_tools = env.from_string(tokenizer.get_chat_template(None, tools=[{}]))
        except ValueError:  # a named-template tokenizer without a tool_use one
            self.with_tools = self.plain

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None, generation: bool) -> str:
        """The text `apply_chat_template(messages, tools=tools, add_generation_prompt=generation)` gives."""
        template = self.plain if tools is None else self.with_tools
        return template.render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=generation, **self.variables
        )

    @classmethod
    def if_equivalent(
        cls, tokenizer: PreTrainedTokenizerBase, native_tools: bool, native_calls: bool
    ) -> _DirectRenderer | None:
        """A direct renderer when it provably matches `apply_chat_template` on probe conversations, else None."""
        try:
            from chattune.compat.transformers import compile_chat_template

            direct = cls(tokenizer, compile_chat_template)
        except Exception:  # a private helper that may move between transformers versions: fall back
            return None
        conv = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And now?"},
        ]
        if native_calls:
            call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}
            conv += [
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "1"},
            ]
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        for probe_tools in [None, tools] if native_tools else [None]:
            for n, gen in itertools.product(range(1, len(conv) + 1), (False, True)):
                try:
                    want = tokenizer.apply_chat_template(
                        conv[:n], tools=probe_tools, tokenize=False, add_generation_prompt=gen
                    )
                except Exception:  # templates that reject some prefixes (e.g. strict role order)
                    continue
                try:
                    if direct.render(conv[:n], probe_tools, gen) != want:
                        return None
                except Exception:  # the direct call failed where the wrapper did not
                    return None
        return direct
