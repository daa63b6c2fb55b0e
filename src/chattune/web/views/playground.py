"""Playground: a base model plus an adapter from the workspace's runs; chat, tools, raw generate, side by side.

Answers can be marked correct or wrong (with a correction) and sent to labeling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import streamlit as st

from chattune.data.formats import sample_to_record
from chattune.data.schema import Conversation, Message, Pair, ToolCall
from chattune.data.templates import ParsedReply
from chattune.infer.chat import parse_tools, reply_messages
from chattune.infer.engine import Engine
from chattune.infer.generate import Sampling, reply_to, stream
from chattune.web.i18n import t
from chattune.web.models import load, pick_model, prompt_ids
from chattune.web.session import require_page
from chattune.web.workspace import Workspace, current

MODES = ["chat", "tool", "raw generate", "side by side"]  # option values; shown through t()
DEFAULT_TOOLS = json.dumps(
    [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ],
    indent=2,
)


def sampling_controls(prefix: str = "") -> Sampling:
    """Sidebar widgets for how tokens are picked (`prefix` keeps keys apart between pages)."""
    sb = st.sidebar
    do_sample = sb.toggle(t("Sample (off: greedy)"), False, key=f"{prefix}do_sample")
    return Sampling(
        max_new_tokens=sb.slider(t("Max new tokens"), 8, 1024, 128, key=f"{prefix}max_new_tokens"),
        temperature=sb.slider(
            t("Temperature"), 0.05, 2.0, 0.7, key=f"{prefix}temperature", disabled=not do_sample
        ),
        top_p=sb.slider(t("Top p"), 0.05, 1.0, 0.9, key=f"{prefix}top_p", disabled=not do_sample),
        do_sample=do_sample,
        seed=int(sb.number_input(t("Seed"), 0, 2**31 - 1, 0, key=f"{prefix}seed")),
    )


def pending_calls(messages: list[Message]) -> list[ToolCall]:
    """Tool calls of the last reply that still wait for an observation, in order."""
    i, answered = len(messages), 0
    while i and messages[i - 1].role == "observation":
        i, answered = i - 1, answered + 1
    calls = []
    while i and messages[i - 1].role == "assistant" and messages[i - 1].tool_call is not None:
        i -= 1
        calls.insert(0, messages[i].tool_call)
    return calls[answered:]


def _stream_reply(engine: Engine, conv: Conversation, sampling: Sampling) -> ParsedReply:
    """Stream the assistant's answer to the conversation into the page; returns it parsed."""
    ids = engine.template.encode_prompt(conv)
    with st.chat_message("assistant"):
        raw = st.write_stream(stream(engine, ids, sampling))
    text = raw if isinstance(raw, str) else "".join(str(x) for x in raw)
    return engine.template.parse_reply(text)


def send_to_labeling(ws: Workspace, status: str = "pending", **record: Any) -> int:
    """Create a label record (source playground) from what the model said or what the user corrected."""
    rid = ws.store().add(
        **record, status=status, author=st.session_state.get("author", ""), source="playground"
    )
    st.toast(t("sent to labeling as record {id}", id=rid))
    return rid


def feedback(ws: Workspace, key: str, make_record: Callable[[str | None], dict[str, Any]]) -> None:
    """Mark the last answer correct or wrong; wrong needs a correction and goes to labeling with it.

    `make_record(answer)` builds the label record's fields with `answer` as the assistant's output.
    """
    st.caption(t("Was the last answer right?"))
    correction = st.text_area(
        t("Correction (the answer it should have given)"), key=f"{key}_correction", height=68
    )
    col_ok, col_wrong = st.columns(2)
    verdict = None
    if col_ok.button(t("Correct"), key=f"{key}_correct", icon=":material/thumb_up:"):
        verdict = "correct"
    if col_wrong.button(t("Wrong"), key=f"{key}_wrong", icon=":material/thumb_down:"):
        if not correction.strip():
            st.error(t("type the answer it should have given in Correction, then press Wrong"))
            return
        verdict = "wrong"
    if verdict is None:
        if done := st.session_state.get(f"{key}_feedback"):
            st.success(t("marked {verdict}; label record {id}", verdict=t(done[0]), id=done[1]))
        return
    # a confirmed answer is ready to train on; a corrected one waits for review on the labeling page
    fields = make_record(None) if verdict == "correct" else make_record(correction)
    rid = send_to_labeling(ws, "accepted" if verdict == "correct" else "pending", **fields)
    st.session_state[f"{key}_feedback"] = (verdict, rid)
    st.success(t("marked {verdict}; label record {id}", verdict=t(verdict), id=rid))


# ---------------------------------------------------------------- modes


def _history() -> list[dict[str, str]]:
    return st.session_state.setdefault("chat", [])


def chat_mode(ws: Workspace, engine: Engine, sampling: Sampling) -> None:
    """Chat with history, retry, clear, feedback and send to labeling."""
    system = st.text_area(t("System prompt"), "", key="system_prompt", height=68)
    history = _history()
    for m in history:
        st.chat_message(m["role"]).write(m["content"])
    col_retry, col_clear, col_send = st.columns(3)
    retry = col_retry.button(t("Retry"), key="retry", disabled=not history)
    if col_clear.button(t("Clear"), key="clear", disabled=not history):
        history.clear()
        st.session_state.pop("chat_feedback", None)
        st.rerun()
    head = [{"role": "system", "content": system}] if system.strip() else []
    if col_send.button(t("Send to labeling"), key="send_chat", disabled=len(history) < 2):
        st.session_state["sent_id"] = send_to_labeling(ws, messages=head + history)
    if history and history[-1]["role"] == "assistant":

        def record(answer: str | None) -> dict[str, Any]:
            last = history[-1] if answer is None else {"role": "assistant", "content": answer}
            return {"messages": head + history[:-1] + [last]}

        feedback(ws, "chat", record)
    prompt = st.chat_input(t("Message the model"), key="chat_input")
    if retry and history and history[-1]["role"] == "assistant":
        history.pop()
    elif prompt:
        history.append({"role": "user", "content": prompt})
        st.chat_message("user").write(prompt)
    else:
        return
    msgs = ([Message("system", system)] if system.strip() else []) + [
        Message(m["role"], m["content"]) for m in history
    ]
    history.append(
        {"role": "assistant", "content": _stream_reply(engine, Conversation(msgs), sampling).display()}
    )
    st.session_state.pop("chat_feedback", None)  # feedback belongs to the answer it was given on
    st.rerun()  # redraw so the buttons see the new history


def _show_message(m: Message) -> None:
    """One tool-mode turn: text, a tool call as name + arguments, or an observation."""
    if m.role == "observation":
        with st.chat_message("observation", avatar=":material/build:"):
            st.markdown(t("**observation** from `{tool}`", tool=m.tool_name or t("tool")))
            st.code(m.content, language=None)
    elif m.tool_call is not None:
        with st.chat_message("assistant"):
            if m.content:
                st.write(m.content)
            st.markdown(t("**tool call:** `{name}`", name=m.tool_call.name))
            st.json(m.tool_call.arguments)
    else:
        st.chat_message(m.role).write(m.content)


def tool_chat_record(system: str, turns: list[Message], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool chat as label fields: canonical messages (each call with its observation) and the tools."""
    head = [Message("system", system)] if system.strip() else []
    record = sample_to_record(Conversation(head + turns, tools))
    return {"messages": record["conversations"], "tools": record.get("tools", [])}


def tool_mode(ws: Workspace, engine: Engine, sampling: Sampling) -> None:
    """Chat with tools: the model's calls are shown as name + arguments and the user types each observation."""
    system = st.text_area(t("System prompt"), "", key="tool_system", height=68)
    tools_text = st.text_area(
        t("Tools (JSON list of tool definitions)"), DEFAULT_TOOLS, key="tools_json", height=220
    )
    try:
        tools = parse_tools(tools_text)
    except ValueError as e:
        st.error(str(e))
        return
    names = ", ".join(tool.get("name") or tool["function"]["name"] for tool in tools)
    st.caption(t("tools offered: {names}", names=names))
    turns: list[Message] = st.session_state.setdefault("tool_chat", [])
    for m in turns:
        _show_message(m)
    col_clear, col_send = st.columns(2)
    if col_clear.button(t("Clear"), key="tool_clear", disabled=not turns):
        turns.clear()
        st.rerun()
    answered = any(m.role == "assistant" for m in turns)
    if col_send.button(t("Send to labeling"), key="send_tool", disabled=not answered):
        st.session_state["sent_id"] = send_to_labeling(ws, **tool_chat_record(system, turns, tools))
    waiting = pending_calls(turns)
    if waiting:
        call = waiting[0]
        # the key follows the history length, so the box is empty again for the next observation
        obs = st.text_area(
            t("Observation for {name} (what the tool returned)", name=call.name),
            key=f"observation_{len(turns)}",
        )
        if not (st.button(t("Send observation"), key="send_observation", type="primary") and obs.strip()):
            return
        turns.append(Message("observation", obs, tool_name=call.name))
        if len(waiting) > 1:
            st.rerun()  # the next call's observation first; the model answers once all are in
    elif prompt := st.chat_input(t("Message the model"), key="tool_input"):
        turns.append(Message("user", prompt))
        _show_message(turns[-1])
    else:
        return
    head = [Message("system", system)] if system.strip() else []
    parsed = _stream_reply(engine, Conversation(head + turns, tools), sampling)
    if parsed.error:
        st.session_state["tool_warning"] = t(
            "the reply looks like a tool call but does not parse: {error}", error=parsed.error
        )
    turns.extend(reply_messages(parsed))  # one history entry per call, as the terminal chat keeps them
    st.rerun()


def raw_mode(ws: Workspace, engine: Engine, sampling: Sampling) -> None:
    """Raw generation with the training encoding of a prompt/response pair."""
    prompt = st.text_area(t("Prompt"), "", key="raw_prompt", height=120)
    if st.button(t("Generate"), key="generate", type="primary") and prompt.strip():
        reply = reply_to(engine, engine.template.encode_prompt(Pair(prompt, "")), sampling)
        st.session_state["raw_result"] = (prompt, reply.display())
        st.session_state.pop("raw_feedback", None)
    if result := st.session_state.get("raw_result"):
        st.text_area(t("Output"), result[1], key="raw_output", disabled=True)
        if st.button(t("Send to labeling"), key="send_raw"):
            st.session_state["sent_id"] = send_to_labeling(ws, instruction=result[0], output=result[1])
        feedback(ws, "raw", lambda answer: {"instruction": result[0], "output": answer or result[1]})


def compare_mode(base: str, adapter: str | None, sampling: Sampling) -> None:
    """The same prompt to the base model and to base + adapter, answers in two columns."""
    if adapter is None:
        st.info(
            t("Choose an adapter in the sidebar: side by side compares the base model with base + adapter.")
        )
        return
    system = st.text_area(t("System prompt"), "", key="compare_system", height=68)
    prompt = st.text_area(t("Prompt"), "", key="compare_prompt", height=100)
    if st.button(t("Ask both"), key="compare", type="primary") and prompt.strip():
        answers = {}
        for label, adapter_path in (("base", None), ("tuned", adapter)):
            engine = load(base, adapter_path)
            if engine is None:
                return
            answers[label] = reply_to(engine, prompt_ids(engine, prompt, system), sampling).display()
        st.session_state["compare_result"] = {"prompt": prompt, **answers}
    if result := st.session_state.get("compare_result"):
        st.caption(t("prompt: {prompt}", prompt=result["prompt"]))
        for col, label, title in zip(st.columns(2), ("base", "tuned"), (t("Base model"), t("Tuned (base + adapter)")),
                                     strict=True):  # fmt: skip
            with col:
                st.subheader(title)
                with st.container(border=True, key=f"answer_{label}"):
                    st.markdown(result[label] or t("*(empty reply)*"))


def page() -> None:
    """The playground page."""
    ws = current()
    require_page(ws, "playground")
    st.title(t("Playground"))
    choice = pick_model(ws)
    sampling = sampling_controls()
    mode = st.radio(t("Mode"), MODES, horizontal=True, key="mode", format_func=t)
    if choice is None:
        return
    if not st.toggle(t("Load the model"), key="load_model"):
        st.info(t("Choose a base model and adapter in the sidebar, then switch on “Load the model”."))
        return
    if mode == "side by side":
        compare_mode(*choice, sampling)
        return
    engine = load(*choice)
    if engine is None:
        return
    st.caption(t("model: {name}", name=engine.name))
    if warning := st.session_state.pop("tool_warning", None):
        st.warning(warning)
    if mode in ("chat", "tool") and engine.template.name == "raw":
        # a raw-template model was trained on prompt/response pairs: it has no roles to chat or call tools with
        st.error(
            t(
                "{model} uses template 'raw' (no roles): use raw generate, or a chat model for {mode}",
                model=engine.name,
                mode=t(mode),
            )
        )
        return
    if mode == "chat":
        chat_mode(ws, engine, sampling)
    elif mode == "tool":
        tool_mode(ws, engine, sampling)
    else:
        raw_mode(ws, engine, sampling)
