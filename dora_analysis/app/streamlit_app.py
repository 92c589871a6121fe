"""dora-analysis dashboard: wires the pages; every page calls the library.

Start it with ``dora-dashboard`` (:mod:`dora_analysis.app.serve`; ``make dashboard`` in a clone),
which passes the server settings: 127.0.0.1 only, the upload cap, the data root.

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
