"""Ollama Modelfiles: a TEMPLATE in Ollama's Go-template language for the chat formats we can write, and a
small renderer of exactly the template subset written here, so tests (and the export itself) can compare
what Ollama will feed the model with what training fed it.

Ollama renders `.Messages` (roles system, user, assistant, tool; the Modelfile's SYSTEM first when the
conversation has no system message); a last assistant message is left open so it can be continued, and
after any other last message the template opens the assistant's turn.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Renderer = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> text

_LOOP = "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"

# One template per family: exactly the format the family's training templates render, roles as given.
TEMPLATES = {
    "chatml": _LOOP
    + (
        '{{- if eq .Role "assistant" }}<|im_start|>assistant\n'
        "{{ .Content }}{{ if not $last }}<|im_end|>\n"
        "{{ end }}\n"
        "{{- else }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}\n"
        '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n'
        "{{ end }}\n"
        "{{- end }}"
    ),
    "llama3": "<|begin_of_text|>\n"
    + _LOOP
    + (
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        '{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}\n'
        '{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n'
        "{{ end }}\n"
        "{{- end }}"
    ),
    # ChatGLM3: see gguf_vocab.CHATGLM3_JINJA for why a space goes before non-empty content
    "chatglm3": "[gMASK]sop\n"
    + _LOOP
    + (
        '{{- if eq .Role "tool" }}<|observation|>{{ else }}<|{{ .Role }}|>{{ end }}\n'
        "{{ if .Content }} {{ .Content }}{{ end }}\n"
        '{{- if and $last (ne .Role "assistant") }}<|assistant|>{{ end }}\n'
        "{{- end }}"
    ),
}


@dataclass
class _Node:
    kind: str  # text | expr | if | range
    text: str = ""
    branches: list[tuple[str | None, list[_Node]]] | None = None  # if: (condition or None for else, body)
    body: list[_Node] | None = None


_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.DOTALL)


def _parse(template: str) -> list[_Node]:
    """Text and actions, trim markers applied (`{{-` eats the whitespace before, `-}}` the whitespace after)."""
    pieces: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        text = text.lstrip() if trim_next else text
        pieces.append(("text", text.rstrip() if m[1] else text))
        pieces.append(("action", m[2]))
        pos, trim_next = m.end(), bool(m[3])
    tail = template[pos:]
    pieces.append(("text", tail.lstrip() if trim_next else tail))
    nodes, rest = _block(pieces, 0)
    if rest != len(pieces):
        raise ValueError("unbalanced {{ end }}")
    return nodes


def _block(pieces: list[tuple[str, str]], i: int) -> tuple[list[_Node], int]:
    nodes: list[_Node] = []
    while i < len(pieces):
        kind, text = pieces[i]
        if kind == "text":
            nodes.append(_Node("text", text))
        elif text == "end" or text == "else" or text.startswith("else if "):
            return nodes, i
        elif text.startswith("if "):
            branches, cond = [], text[3:]
            while True:
                body, i = _block(pieces, i + 1)
                branches.append((cond, body))
                closing = pieces[i][1] if i < len(pieces) else "end"
                if closing == "end":
                    break
                cond = closing[8:] if closing.startswith("else if ") else None
            nodes.append(_Node("if", branches=branches))
        elif text == "range $i, $_ := .Messages":
            body, i = _block(pieces, i + 1)
            nodes.append(_Node("range", body=body))
        elif text.split(" ", 1)[0] in ("range", "with", "define", "template", "block", "break", "continue"):
            raise ValueError(f"unsupported template action {{{{ {text} }}}}")
        else:
            nodes.append(_Node("expr", text))
        i += 1
    return nodes, i


def _tokens(expr: str) -> list[str]:
    return re.findall(r'"[^"]*"|\(|\)|[^\s()]+', expr)


def _eval(tokens: list[str], scope: dict[str, Any]) -> Any:
    """A Go pipeline of one function call (or one value) over literal strings, numbers, fields, variables."""
    args, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            args.append(_eval(tokens[i + 1 : j - 1], scope))
            i = j
            continue
        args.append(tok)
        i += 1
    values = [_value(a, scope) if isinstance(a, str) else a for a in args[1:]]
    head = args[0]
    functions: dict[str, Callable[..., Any]] = {
        "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a,
        "and": lambda a, b: a and b, "or": lambda a, b: a or b, "len": len, "slice": lambda s, k: s[k:],
    }  # fmt: skip
    if isinstance(head, str) and head in functions:
        return functions[head](*values)
    if values:
        raise ValueError(f"unsupported template call {head!r}")
    return _value(head, scope) if isinstance(head, str) else head


def _value(tok: str, scope: dict[str, Any]) -> Any:
    if tok.startswith('"'):
        return tok[1:-1]
    if tok.isdigit():
        return int(tok)
    if tok == "$.Messages":
        return scope["messages"]
    if tok.startswith("$"):
        return scope[tok]
    if tok in (".Role", ".Content"):
        return scope["dot"][tok[1:].lower()]
    raise ValueError(f"unsupported template value {tok!r}")


def _run(nodes: list[_Node], scope: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "range":
            for i, message in enumerate(scope["messages"]):
                _run(node.body or [], scope | {"$i": i, "dot": message}, out)
        elif node.kind == "if":
            for cond, body in node.branches or []:
                if cond is None or _eval(_tokens(cond), scope):
                    _run(body, scope, out)
                    break
        elif node.text.startswith("$last := "):
            scope["$last"] = _eval(_tokens(node.text[len("$last := ") :]), scope)
        else:
            out.append(str(_eval(_tokens(node.text), scope)))


def render(template: str, messages: list[dict[str, str]], system: str | None = None) -> str:
    """The prompt Ollama builds from `messages` with this TEMPLATE (and Modelfile SYSTEM), for the subset of
    Go's text/template written above; anything else is a ValueError, never a guess."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    out: list[str] = []
    _run(_parse(template), {"messages": messages}, out)
    return "".join(out)


def ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages as Ollama's API takes them (tool results have role `tool`)."""
    return [
        {"role": "tool" if m["role"] == "observation" else m["role"], "content": m["content"]}
        for m in messages
    ]


PROBES = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "6"},
    ],
]


def default_system(render_jinja: Renderer) -> str | None:
    """The system prompt a chat template adds when the conversation has none (SmolLM2, Qwen2.5), if any."""
    user = [{"role": "user", "content": "zzprobe"}]
    with_system = render_jinja([{"role": "system", "content": "zzsystem"}, *user], False)
    plain = render_jinja(user, False)
    head, _, tail = with_system.partition("zzsystem")
    if plain.startswith(head) and plain.endswith(tail) and not plain.startswith(head + "zzprobe"):
        found = plain[len(head) : len(plain) - len(tail)]
        return found if "zzprobe" not in found else None
    return None


def renders_like(template: str, system: str | None, render_jinja: Renderer, stops: list[str]) -> bool:
    """Whether `template` renders every probe as the training chat template does: each prompt exactly, and
    each finished reply up to its stop token (Ollama leaves the last reply open; the model writes the stop)."""
    for conv in PROBES:
        for n in range(1, len(conv) + 1):
            part = conv[:n]
            prompt = part[-1]["role"] != "assistant"
            want = render_jinja(part, prompt)
            got = render(template, ollama_messages(part), system)
            rest = want[len(got) :] if want.startswith(got) else None
            if (prompt and got != want) or rest is None or (rest.strip() and rest.rstrip() not in stops):
                return False
    return True


def find_family(render_jinja: Renderer, stops: list[str]) -> tuple[str, str | None] | None:
    """(family, default system) whose TEMPLATE renders like the training chat template; None if none does."""
    try:
        system = default_system(render_jinja)
        return next(
            ((f, system) for f, t in TEMPLATES.items() if renders_like(t, system, render_jinja, stops)), None
        )
    except Exception:  # a chat template that rejects a probe (say, strict role alternation): no family
        return None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile value cannot hold """')
    return f'"""{text}"""'


def modelfile(gguf_name: str, family: str | None, system: str | None, stops: list[str], sampling: Any) -> str:
    """The Modelfile text: FROM the GGUF, TEMPLATE (if the family is known), SYSTEM, stops and sampling."""
    lines = [f"FROM ./{gguf_name}"]
    if family is None:
        lines.append(
            "# No TEMPLATE: the run's chat template is not one chattune writes in Ollama's template language\n"
            "# (ChatML, Llama 3, ChatGLM3). Ollama falls back to the GGUF's own chat template when it knows it;\n"
            "# otherwise write a TEMPLATE that renders exactly what the GGUF's tokenizer.chat_template renders."
        )
    else:
        lines.append(f"TEMPLATE {_quote(TEMPLATES[family])}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += [
        f"PARAMETER stop {_quote(s) if chr(34) in s or chr(10) in s else chr(34) + s + chr(34)}"
        for s in stops
    ]
    if sampling.do_sample:
        lines += [f"PARAMETER temperature {sampling.temperature}", f"PARAMETER top_p {sampling.top_p}"]
    else:  # as `chattune infer` and `chat` decode by default
        lines += ["# greedy, as chattune decodes by default; to sample, e.g. temperature 0.7 and top_p 0.9"]
        lines += ["PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"
