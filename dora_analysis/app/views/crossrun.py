"""Cross-run: how alike several runs' updates are (dora_analysis.compare_runs), as heatmaps.

The runs are the loaded table's checkpoints (each at its last step), compared against the base
the table names (its ``base`` column; editable), or a cross-run table saved by
``dora-analyze --cross-run``. Every path is read through the access check, as on every page.
"""

import streamlit as st

from dora_analysis import columns as C
from dora_analysis import heatmaps
from dora_analysis.app import cache
from dora_analysis.metrics.base import CROSS_RUN_K, CROSS_RUN_TRIM

CROSS_KEY = "cross_run"

st.header("Cross-run similarity")
st.caption("Per weight matrix and pair of runs: the cosine of the two updates ΔW, the overlap of "
           "their top-k left singular subspaces (LoRA §7.2), TIES' sign conflict among their "
           "largest entries, and the Jaccard index of the weights each changed.")

table = cache.current_table()
tab_compute, tab_open = st.tabs(["Compare the loaded runs", "Open a saved cross-run table"])
with tab_compute:
    if table is None or C.REF not in table:
        st.info("Load or analyse two runs or more on the **Data** page first.")
    else:
        refs = cache.last_step_refs(table)
        recorded = sorted({b for b in table.get(C.BASE, []) if isinstance(b, str) and b})
        with st.form("compare_runs"):
            base = st.text_input("Base checkpoint", value=recorded[0] if len(recorded) == 1
                                 else "", placeholder="path/to/base/ or org/model",
                                 help="filled in from the table's base column when it names "
                                 "one")
            runs = st.multiselect("Runs (each at its last step)", list(refs), default=list(refs))
            cols = st.columns(3)
            k = cols[0].number_input("k (top singular vectors)", 1, 4096, CROSS_RUN_K)
            trim = cols[1].number_input("TIES kept share", 0.001, 1.0, CROSS_RUN_TRIM,
                                        step=0.05, format="%.3f")
            modules_text = cols[2].text_input(  # those the table analysed
                "Module kinds (empty = all)", value=",".join(dict.fromkeys(table[C.MODULE])))
            submitted = st.form_submit_button("Compare runs", type="primary")
        if submitted:
            try:
                access = cache.access()
                modules = tuple(m.strip() for m in modules_text.split(",") if m.strip())
                cross = cache.compare_runs(
                    access.resolve(base), [cache.table_source(access, refs[r]) for r in runs],
                    runs, modules or None, int(k), float(trim))
                st.session_state[CROSS_KEY] = cross
            except Exception as exc:  # shown in the page, never as a traceback
                cache.show_error(exc)
with tab_open:
    upload = st.file_uploader("A table written by dora-analyze --cross-run (CSV, JSON or "
                              "Parquet)", type=["csv", "json", "parquet"], key="cross_upload")
    if upload is not None:
        try:
            st.session_state[CROSS_KEY] = cache.read_uploaded_cross_run(upload.name,
                                                                         upload.getvalue())
        except Exception as exc:  # shown in the page, never as a traceback
            cache.show_error(exc)

cross = st.session_state.get(CROSS_KEY)
if cross is None:
    st.stop()
if cross.empty:
    st.info("The comparison holds no rows.")
    st.stop()
measure = st.radio("Measure", list(C.CROSS_RUN_MEASURES), horizontal=True)
st.plotly_chart(heatmaps.cross_run_overview(cross, measure), width="content")
pairs = heatmaps.run_pairs(cross)
chosen = st.multiselect("Pairs of runs", [f"{a} vs {b}" for a, b in pairs],
                        default=[f"{a} vs {b}" for a, b in pairs[:heatmaps.MAX_PAIRS]])
selected = [p for p in pairs if f"{p[0]} vs {p[1]}" in chosen]
if selected:
    st.plotly_chart(heatmaps.cross_run_heatmaps(cross, measure, pairs=selected),
                    width="stretch")
st.dataframe(cross, hide_index=True, width="stretch")
st.download_button("Download the cross-run table (CSV)", cross.to_csv(index=False),
                   file_name="dora-analysis-cross-run.csv", mime="text/csv")
