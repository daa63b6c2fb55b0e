"""Cookies the app keeps in the browser (the signed session, the chosen language).

Streamlit reads cookies (`st.context.cookies`, as sent when the browser session connected) but has no call to
set one; its HTML component runs on the app's own origin, so a line of script there sets it.
"""

from __future__ import annotations

import json

import streamlit as st


def read_cookie(name: str) -> str | None:
    """The cookie's value as the browser sent it when this session connected."""
    value = st.context.cookies.get(name)
    return value if isinstance(value, str) else None


def set_cookie(name: str, value: str, max_age_s: int) -> None:
    """Set the cookie `name` for the whole app (max_age_s 0 clears it)."""
    import streamlit.components.v1 as components

    cookie = f"{name}={value}; Max-Age={max_age_s}; Path=/; SameSite=Strict"
    components.html(f"<script>document.cookie = {json.dumps(cookie)};</script>", height=0)
