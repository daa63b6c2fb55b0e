"""The Streamlit entry point: `streamlit run app.py -- WORKSPACE` (what `chattune web` runs)."""

from __future__ import annotations

import streamlit as st

from chattune.web.nav import pages
from chattune.web.workspace import current


def main() -> None:
    """Set up the page and route to the chosen page."""
    st.set_page_config(page_title="chattune", layout="wide")
    ws = current()
    nav = st.navigation(pages())
    st.sidebar.caption(f"workspace: {ws.root}")
    nav.run()


main()
