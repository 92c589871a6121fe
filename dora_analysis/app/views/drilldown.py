"""Drill-down: one weight matrix of one checkpoint in detail (dora_analysis.matrix_detail).

The base — the table's ``base`` column for the chosen row, or what a visitor types — and the
``ref`` of the chosen row (a loaded table may name any path) are both read through the access
check, as on every page; an adapter uploaded in this session is read from the session.
"""


import streamlit as st

import dora_analysis as da
from dora_analysis import plots
from dora_analysis.app import cache
from dora_analysis.columns import AXES

table = cache.current_table()
if table is None:
    st.info("No data yet: open the **Data** page to load or analyse checkpoints first.")
    st.stop()
try:
    access = cache.access()
except da.DoraAnalysisError as exc:  # a data root that is not a folder: nothing is read
    cache.show_error(exc)
    st.stop()

st.header("Drill-down: one matrix")
st.caption("The per-vector numbers behind one row of the table — Δm = m_t − m_0 (ΔM is the mean "
           "of |Δm|), 1 − cos (ΔD is its mean) — the singular values of ΔW against W0's, and the "
           "intruder test (best |cos| of each top singular vector of Wt with W0's).")
if "ref" not in table or "name" not in table:
    st.info("This table does not record which files it came from (no ref/name columns).")
    st.stop()

cols = st.columns(4)
label = cols[0].selectbox("Checkpoint", list(dict.fromkeys(table["checkpoint"])))
rows = table[table["checkpoint"] == label]
steps = sorted(int(s) for s in rows["step"].dropna().unique())
if steps:
    step = cols[1].selectbox("Step", steps, index=len(steps) - 1)
    rows = rows[rows["step"] == step]
name = cols[2].selectbox("Matrix", list(dict.fromkeys(rows["name"])))
axis = cols[3].radio("Axis", [a for a in AXES if a in set(rows["axis"])], horizontal=True)
row = rows[(rows["name"] == name) & (rows["axis"] == axis)].iloc[0]
# A table names the base it was measured against (its base column): offered, still editable.
recorded = str(row["base"]) if "base" in row and isinstance(row["base"], str) else ""
if recorded and not st.session_state.get("drilldown_base"):
    st.session_state["drilldown_base"] = recorded
base = st.text_input("Base checkpoint (the BASE of the analysis)", key="drilldown_base",
                     placeholder="path/to/base/ or org/model",
                     help="filled in from the table's base column when it has one")
expert = None
if "expert" in rows and rows["expert"].notna().any():
    expert = int(st.selectbox("Expert", sorted(int(e) for e in rows["expert"].dropna().unique())))
k = st.slider("Intruder test: top-k singular vectors", 0, 50, 10)
eps = st.slider("Intruder test: ε", 0.05, 1.0, 0.5, step=0.05)

if access.describe():
    st.info(access.describe())
if not base.strip():
    st.info("Name the base checkpoint to read this matrix.")
    st.stop()
try:
    tuned = cache.table_source(access, str(row["ref"]))
    result = cache.matrix_detail(access.resolve(base), tuned, name, axis=axis, expert=expert,
                                  k=k, eps=eps)
except Exception as exc:  # shown in the page, never as a traceback
    cache.show_error(exc)
    st.stop()
st.plotly_chart(plots.drilldown_figure(result), width="stretch")
vectors = result.vectors()
st.dataframe(vectors, hide_index=True, width="stretch",
             column_config=cache.number_formats())
st.download_button("Download the per-vector table (CSV)", vectors.to_csv(index=False),
                   file_name=f"{name}-{label}-vectors.csv", mime="text/csv")
