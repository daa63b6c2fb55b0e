"""The Streamlit entry point: `streamlit run app.py -- WORKSPACE` (what `chattune web` runs)."""

from __future__ import annotations

import streamlit as st

from chattune.web.views import labeling, monitor, playground
from chattune.web.workspace import current


def main() -> None:
    """Set up the page and route to the chosen page."""
    st.set_page_config(page_title="chattune", layout="wide")
    ws = current()
    nav = st.navigation(
        [
            st.Page(labeling.page, title="Labeling", url_path="labeling", default=True),
            st.Page(monitor.page, title="Training monitor", url_path="monitor"),
            st.Page(playground.page, title="Playground", url_path="playground"),
        ]
    )
    st.sidebar.caption(f"workspace: {ws.root}")
    nav.run()


main()
