"""The app's pages as st.Page objects, so pages can link to each other (with query parameters) and to the nav."""

from __future__ import annotations

import streamlit as st

TITLES = {"labeling": "Labeling", "monitor": "Training monitor", "playground": "Playground"}


def page(name: str) -> st.Page:
    """The st.Page for `name` (labeling, monitor or playground); equal objects each call, same url_path."""
    # imported here: the views import this module to link to each other
    from chattune.web.views import labeling, monitor, playground

    views = {"labeling": labeling.page, "monitor": monitor.page, "playground": playground.page}
    return st.Page(views[name], title=TITLES[name], url_path=name, default=name == "labeling")


def pages() -> list[st.Page]:
    """Every page, in the order the sidebar lists them."""
    return [page(n) for n in TITLES]
