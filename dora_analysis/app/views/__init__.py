"""The dashboard's pages: scripts that Streamlit runs (wired in ``streamlit_app.py``)."""
