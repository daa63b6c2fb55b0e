"""The model a page works with: chosen in the sidebar (inside the workspace), loaded once for every session,
and prompted with a single user turn. Used by the playground and by labeling's "prefill from model"."""

from __future__ import annotations

import streamlit as st

from chattune.data.schema import Conversation, Message, Pair
from chattune.infer.engine import Engine
from chattune.web.i18n import t
from chattune.web.workspace import Workspace

NO_ADAPTER = "(none: base model only)"  # an option value; shown through t()
DEFAULT_BASE = "smollm2-135m-instruct"


# the spinner is load()'s: a decorator's text is fixed at import, before any session has a language
@st.cache_resource(max_entries=2, show_spinner=False)
def _engine(base: str, adapter: str | None) -> Engine:
    """A loaded model, shared by every session (loading takes long; two kept for base vs tuned)."""
    from chattune.infer.engine import load_engine

    return load_engine(base, adapter)


def load(base: str, adapter: str | None) -> Engine | None:
    """The cached engine for (base, adapter), or None after showing why it could not be loaded."""
    try:
        # st.spinner waits a moment before it shows, so a cached model draws no spinner
        with st.spinner(t("loading the model…")):
            return _engine(base, adapter)
    except Exception as e:  # any loading failure is shown on the page rather than crashing the app
        st.error(t("could not load the model: {error}", error=e))
        return None


def pick_model(ws: Workspace, prefix: str = "") -> tuple[str, str | None] | None:
    """Base model and adapter chosen in the sidebar, checked against the workspace.

    `?base=` and `?adapter=` in the URL preselect them, so the monitor can link a finished run here.
    """
    sb = st.sidebar
    adapters = [NO_ADAPTER, *ws.adapters()]
    wanted = st.query_params.get("adapter")
    base_text = sb.text_input(t("Base model"), st.query_params.get("base", DEFAULT_BASE), key=f"{prefix}base_model",
                              help=t("a model directory inside the workspace, or a hub id / alias"))  # fmt: skip
    index = adapters.index(wanted) if wanted in adapters else 0
    adapter = sb.selectbox(t("Adapter"), adapters, index=index, key=f"{prefix}adapter",
                         format_func=lambda a: t("(none: base model only)") if a == NO_ADAPTER else a)  # fmt: skip
    try:
        base = ws.model_source(base_text)
        adapter_path = None if adapter == NO_ADAPTER else str(ws.resolve(adapter))
    except ValueError as e:
        st.error(str(e))
        return None
    return base, adapter_path


def prompt_ids(engine: Engine, prompt: str, system: str = "") -> list[int]:
    """A single prompt as the model expects it: a chat turn, or the raw pair encoding for raw-template models."""
    if engine.template.name == "raw":
        return engine.template.encode_prompt(Pair(prompt, ""))
    msgs = ([Message("system", system)] if system.strip() else []) + [Message("user", prompt)]
    return engine.template.encode_prompt(Conversation(msgs))
