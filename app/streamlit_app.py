"""dora-analysis dashboard: wires the pages; every page calls the library.

Start:  streamlit run app/streamlit_app.py      (or `make dashboard`, which opens the demo data)
from the repository root, so that .streamlit/config.toml applies (127.0.0.1 only, upload cap).

The pages live in ``views/``, not ``pages/``: Streamlit would also list a ``pages/`` folder as
pages of its own, beside the ones wired here.
"""

import streamlit as st

st.set_page_config(page_title="dora-analysis", layout="wide")
st.navigation([
    st.Page("views/data.py", title="Data", icon=":material/folder_open:", default=True),
    st.Page("views/figures.py", title="Figures", icon=":material/scatter_plot:"),
    st.Page("views/tables.py", title="Tables", icon=":material/table:"),
    st.Page("views/live.py", title="Follow a run", icon=":material/autorenew:", url_path="live"),
    st.Page("views/drilldown.py", title="Drill-down", icon=":material/zoom_in:"),
    st.Page("views/crossrun.py", title="Cross-run", icon=":material/compare_arrows:"),
]).run()
