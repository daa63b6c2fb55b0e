"""The web app's languages: English (the source strings) and Simplified Chinese.

Every string a page shows goes through `t("English text", name=value)`: the English text is the key, the
Chinese table below its translation (`{name}` placeholders are filled after the lookup, so word order may
change). The language comes from the browser (`st.context.locale`) until the user picks one in the sidebar.
tests/web/test_i18n.py fails when a page shows a literal string without `t()` or a `t()` string has no
translation. CLI messages stay English.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

LANGUAGES = {"en": "English", "zh": "简体中文"}
LANGUAGE_KEY = "ui_language"

ZH: dict[str, str] = {
    # app and sign-in
    "Language": "语言",
    "Sign in": "登录",
    "Sign out": "退出登录",
    "Access token": "访问令牌",
    "This app is shared on the network: sign in with the token `chattune web` printed when it started.": (
        "此应用在网络上共享：请使用 `chattune web` 启动时打印的令牌登录。"
    ),
    "That token is not valid.": "令牌无效。",
    "Your session has expired: sign in again.": "会话已过期，请重新登录。",
    "signed in as {role}": "已登录：{role}",
    "admin": "管理员",
    "annotator": "标注员",
    "workspace: {root}": "工作区：{root}",
    "This page is for admins: annotators label data on the Labeling page.": (
        "此页面仅限管理员：标注员请在“标注”页面标注数据。"
    ),
    "This server listens on {address} but has no login set up: start it with `chattune web`.": (
        "此服务器监听 {address}，但未设置登录：请使用 `chattune web` 启动。"
    ),
    "Labeling": "标注",
    "Training monitor": "训练监控",
    "Playground": "试用",
}


def language() -> str:
    """The session's language: the user's pick, else the browser's (Chinese for any zh locale), else English."""
    picked = st.session_state.get(LANGUAGE_KEY)
    if picked in LANGUAGES:
        return picked
    locale = (st.context.locale or "").lower()
    return "zh" if locale.startswith("zh") else "en"


def t(text: str, **values: Any) -> str:
    """`text` in the session's language, with `{name}` placeholders filled from `values`."""
    translated = ZH.get(text, text) if language() == "zh" else text
    return translated.format(**values) if values else translated


def language_switch() -> None:
    """The sidebar's language picker; starts at the browser's language."""
    codes = list(LANGUAGES)
    current = language()
    chosen = st.sidebar.selectbox(
        t("Language"),
        codes,
        index=codes.index(current),
        format_func=LANGUAGES.__getitem__,
        key="language_pick",
    )
    if chosen != current:
        st.session_state[LANGUAGE_KEY] = chosen
        st.rerun()
