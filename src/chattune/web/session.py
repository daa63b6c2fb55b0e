"""The signed-in user of one browser session: the sign-in form, the session's role, and page guards."""

from __future__ import annotations

import time

import streamlit as st

from chattune.system import is_loopback
from chattune.web.auth import COOKIE, FAILED_SIGN_IN_DELAY_S, PAGES, SESSION_KEY, Auth, Role
from chattune.web.cookies import read_cookie, set_cookie
from chattune.web.i18n import t
from chattune.web.workspace import Workspace


def server_address() -> str:
    """The address this Streamlit server listens on ("" when unset: Streamlit then listens on all of them)."""
    return str(st.get_option("server.address") or "")


def session_role(ws: Workspace) -> Role | None:
    """The session's role: admin on a loopback server without a login; else what its signed session says
    (None: not signed in, or expired). Stops the page on a non-loopback server that has no login set up."""
    auth = Auth.load(ws.root)
    if auth is None:
        address = server_address()
        if address and is_loopback(address):
            return "admin"
        st.error(t("This server listens on {address} but has no login set up: start it with `chattune web`.",
                   address=address or "0.0.0.0"))  # fmt: skip
        st.stop()
    session = st.session_state.get(SESSION_KEY)
    # a new browser session (a reload, a page opened by its address) takes the cookie's, unless this session
    # signed out: its cookies were read when it connected, so they still hold the old one
    if session is None and not st.session_state.get("signed_out"):
        session = auth.from_cookie(read_cookie(COOKIE))
        if session is not None:
            st.session_state[SESSION_KEY] = session
    role = auth.verify(session)
    if role is None and session is not None:
        st.session_state.pop(SESSION_KEY, None)
        st.session_state["session_expired"] = True
    return role


def sign_in(ws: Workspace) -> None:
    """The sign-in form; a valid token starts a signed session and reruns the app."""
    auth = Auth.load(ws.root)
    assert auth is not None, "sign_in is only shown when the app has a login"
    st.title("chattune")
    if st.session_state.pop("session_expired", False):
        st.warning(t("Your session has expired: sign in again."))
    st.write(
        t("This app is shared on the network: sign in with the token `chattune web` printed when it started.")
    )
    with st.form("sign_in"):
        token = st.text_input(t("Access token"), type="password", key="sign_in_token")
        submitted = st.form_submit_button(t("Sign in"), type="primary")
    if not submitted:
        return
    role = auth.role_of(token)
    if role is None:
        time.sleep(FAILED_SIGN_IN_DELAY_S)
        st.error(t("That token is not valid."))
        return
    session = st.session_state[SESSION_KEY] = auth.sign(role)
    st.session_state["cookie"] = auth.to_cookie(session)
    st.session_state.pop("signed_out", None)
    st.rerun()


def sync_cookie(ws: Workspace) -> None:
    """Write or clear the cookie that a sign-in or sign-out asked for (drawn after its rerun, on a page that
    stays, so the script runs)."""
    auth = Auth.load(ws.root)
    value = st.session_state.pop("cookie", None)
    if auth is not None and value is not None:
        set_cookie(COOKIE, value, auth.session_s if value else 0)


def sign_out_button(ws: Workspace) -> None:
    """A sidebar button that ends the session (only where there is a login)."""
    if Auth.load(ws.root) is not None and st.sidebar.button(t("Sign out"), key="sign_out"):
        st.session_state.pop(SESSION_KEY, None)
        st.session_state["cookie"] = ""  # cleared on the sign-in page the rerun draws
        st.session_state["signed_out"] = True
        st.rerun()


def require_page(ws: Workspace, page: str) -> Role:
    """The session's role if it may open `page`; otherwise the page stops here with a message.

    Every page calls this first, so a page opened by its address, a link or a crafted request checks the
    session itself rather than trusting the navigation that led there."""
    role = session_role(ws)
    if role is None:
        sign_in(ws)
        st.stop()
    if page not in PAGES[role]:
        st.error(t("This page is for admins: annotators label data on the Labeling page."))
        st.stop()
    return role
