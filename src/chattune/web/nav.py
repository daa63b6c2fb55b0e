"""The app's page addresses and titles, and links to them, for pages that point to each other.

Streamlit knows a page by its url_path, so a link built here is the page app.py registered under that path;
the views link through this module without importing one another or the app.
"""

from __future__ import annotations

import streamlit as st

from chattune.web.i18n import t

# url_path -> title (English; shown through t()), in the order the sidebar lists them
TITLES = {"labeling": "Labeling", "monitor": "Training monitor", "playground": "Playground"}
ICONS = {
    "labeling": ":material/edit_note:",
    "monitor": ":material/monitoring:",
    "playground": ":material/chat:",
}


def _registered_elsewhere() -> None:
    raise RuntimeError("a link page runs only through the page app.py registered under the same url_path")


def link(name: str) -> st.Page:
    """The page `name` (labeling, monitor, playground) for st.page_link / st.switch_page."""
    return st.Page(_registered_elsewhere, title=t(TITLES[name]), icon=ICONS[name], url_path=name)
