"""The Streamlit entry point: `streamlit run app.py -- WORKSPACE` (what `chattune web` runs)."""

from __future__ import annotations

import streamlit as st

from chattune.web.auth import PAGES, Role
from chattune.web.i18n import language_switch, t
from chattune.web.nav import ICONS, TITLES, link
from chattune.web.session import session_role, sign_in, sign_out_button, sync_cookie
from chattune.web.views import labeling, monitor, playground
from chattune.web.workspace import Workspace, current

VIEWS = {"labeling": labeling.page, "monitor": monitor.page, "playground": playground.page}


def navigation(ws: Workspace, role: Role | None) -> list[st.Page]:
    """Every page by its own address; a hidden home page at the root opens the role's first page.

    Pages a role may not open (all of them before signing in) stay registered but hidden, so their address
    keeps working: the page itself asks to sign in or refuses, and after signing in the same address opens."""
    allowed = PAGES[role] if role is not None else ()

    def home() -> None:
        if role is None:
            sign_in(ws)
        else:
            st.switch_page(link(allowed[0]))

    pages = [st.Page(home, title="chattune", url_path="home", default=True, visibility="hidden")]
    for name, view in VIEWS.items():
        visible = "visible" if name in allowed else "hidden"
        pages.append(
            st.Page(view, title=t(TITLES[name]), icon=ICONS[name], url_path=name, visibility=visible)
        )
    return pages


def main() -> None:
    """Set up the page, sign in where needed, and route to the chosen page."""
    st.set_page_config(page_title="chattune", layout="wide")
    ws = current()
    language_switch()
    role = session_role(ws)
    sync_cookie(ws)
    chosen = st.navigation(navigation(ws, role))
    if role is not None:
        st.sidebar.caption(t("workspace: {root}", root=ws.root))
        st.sidebar.caption(t("signed in as {role}", role=t(role)))
        sign_out_button(ws)
    chosen.run()


main()
