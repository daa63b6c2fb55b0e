"""The web app's pages, each a `page()` function.

Not named pages/: Streamlit treats a pages/ folder beside app.py as its old directory navigation and then
never runs app.py (so st.navigation would be ignored).
"""
