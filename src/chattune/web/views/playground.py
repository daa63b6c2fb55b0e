"""Playground: a base model plus an adapter from the workspace's runs; chat or raw generate; send to labeling."""

from __future__ import annotations

from typing import Any

import streamlit as st

from chattune.data.schema import Conversation, Message, Pair
from chattune.infer.engine import Engine
from chattune.infer.generate import Sampling, generate_batch, stream
from chattune.web.workspace import Workspace, current

NO_ADAPTER = "(none: base model only)"


@st.cache_resource(max_entries=2, show_spinner="loading the model…")
def _engine(base: str, adapter: str | None) -> Engine:
    """A loaded model, shared by every session (loading takes long; two kept for base vs tuned)."""
    from chattune.infer.engine import load_engine

    return load_engine(base, adapter)


def sampling_controls() -> Sampling:
    """Sidebar widgets for how tokens are picked."""
    sb = st.sidebar
    do_sample = sb.toggle("Sample (off: greedy)", False, key="do_sample")
    return Sampling(
        max_new_tokens=sb.slider("Max new tokens", 8, 1024, 128, key="max_new_tokens"),
        temperature=sb.slider("Temperature", 0.05, 2.0, 0.7, key="temperature", disabled=not do_sample),
        top_p=sb.slider("Top p", 0.05, 1.0, 0.9, key="top_p", disabled=not do_sample),
        do_sample=do_sample,
        seed=int(sb.number_input("Seed", 0, 2**31 - 1, 0, key="seed")),
    )


def pick_model(ws: Workspace) -> tuple[str, str | None] | None:
    """Base model and adapter chosen in the sidebar, checked against the workspace."""
    sb = st.sidebar
    base_text = sb.text_input("Base model", "smollm2-135m-instruct", key="base_model",
                              help="a model directory inside the workspace, or a hub id / alias")  # fmt: skip
    adapter = sb.selectbox("Adapter", [NO_ADAPTER, *ws.adapters()], key="adapter")
    try:
        base = ws.model_source(base_text)
        adapter_path = None if adapter == NO_ADAPTER else str(ws.resolve(adapter))
    except ValueError as e:
        st.error(str(e))
        return None
    return base, adapter_path


def _history() -> list[dict[str, str]]:
    return st.session_state.setdefault("chat", [])


def _reply(engine: Engine, system: str, history: list[dict[str, str]], sampling: Sampling) -> str:
    """Stream the assistant's answer to the conversation so far into the page; returns it parsed."""
    msgs = ([Message("system", system)] if system.strip() else []) + [
        Message(m["role"], m["content"]) for m in history
    ]
    ids = engine.template.encode_prompt(Conversation(msgs))
    with st.chat_message("assistant"):
        raw = st.write_stream(stream(engine, ids, sampling))
    text = raw if isinstance(raw, str) else "".join(str(x) for x in raw)
    return engine.template.parse_reply(text).display()


def send_to_labeling(ws: Workspace, **record: Any) -> int:
    """Create a pending label record from what the model said."""
    rid = ws.store().add(
        **record, status="pending", author=st.session_state.get("author", ""), source="playground"
    )
    st.toast(f"sent to labeling as record {rid}")
    return rid


def chat_mode(ws: Workspace, engine: Engine, sampling: Sampling) -> None:
    """Chat with history, retry, clear and send to labeling."""
    system = st.text_area("System prompt", "", key="system_prompt", height=68)
    history = _history()
    for m in history:
        st.chat_message(m["role"]).write(m["content"])
    col_retry, col_clear, col_send = st.columns(3)
    retry = col_retry.button("Retry", key="retry", disabled=not history)
    if col_clear.button("Clear", key="clear", disabled=not history):
        history.clear()
        st.rerun()
    if col_send.button("Send to labeling", key="send_chat", disabled=len(history) < 2):
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + history
        st.session_state["sent_id"] = send_to_labeling(ws, messages=msgs)
    prompt = st.chat_input("Message the model", key="chat_input")
    if retry and history and history[-1]["role"] == "assistant":
        history.pop()
    elif prompt:
        history.append({"role": "user", "content": prompt})
        st.chat_message("user").write(prompt)
    else:
        return
    history.append({"role": "assistant", "content": _reply(engine, system, history, sampling)})
    st.rerun()  # redraw so the buttons see the new history


def raw_mode(ws: Workspace, engine: Engine, sampling: Sampling) -> None:
    """Raw generation with the training encoding of a prompt/response pair."""
    prompt = st.text_area("Prompt", "", key="raw_prompt", height=120)
    if st.button("Generate", key="generate", type="primary") and prompt.strip():
        raw = generate_batch(
            engine, [engine.template.encode_prompt(Pair(prompt, ""))], sampling, batch_size=1
        )[0]
        st.session_state["raw_result"] = (prompt, engine.template.parse_reply(raw).display())
    if result := st.session_state.get("raw_result"):
        st.text_area("Output", result[1], key="raw_output", disabled=True)
        if st.button("Send to labeling", key="send_raw"):
            st.session_state["sent_id"] = send_to_labeling(ws, instruction=result[0], output=result[1])


def page() -> None:
    """The playground page."""
    ws = current()
    st.title("Playground")
    choice = pick_model(ws)
    sampling = sampling_controls()
    mode = st.radio("Mode", ["chat", "raw generate"], horizontal=True, key="mode")
    if choice is None:
        return
    if not st.toggle("Load the model", key="load_model"):
        st.info("Choose a base model and adapter in the sidebar, then switch on “Load the model”.")
        return
    try:
        engine = _engine(*choice)
    except Exception as e:  # any loading failure is shown on the page rather than crashing the app
        st.error(f"could not load the model: {e}")
        return
    st.caption(f"model: {engine.name}")
    if mode == "chat":
        chat_mode(ws, engine, sampling)
    else:
        raw_mode(ws, engine, sampling)
