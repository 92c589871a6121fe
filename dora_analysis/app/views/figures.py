"""Figures: the paper's Figure 2 (ΔD vs ΔM) and Figure 3 (per layer), with filters."""


import streamlit as st

import dora_analysis as da
from dora_analysis import plots
from dora_analysis.app import cache
from dora_analysis.columns import AXES
from dora_analysis.plots import report_modules

table = cache.current_table()
if table is None:
    st.info("No data yet: open the **Data** page to load the demo, analyse checkpoints or open "
            "a table.")
    st.stop()

with st.sidebar:
    st.header("Filters")
    modules = report_modules(table)
    module = st.selectbox("Module kind (Figure 2)", modules)
    axis = st.radio("Axis", [a for a in AXES if a in set(table["axis"])], horizontal=True)
    checkpoints = st.multiselect("Checkpoints", list(dict.fromkeys(table["checkpoint"])),
                                 default=list(dict.fromkeys(table["checkpoint"])))
    layers = sorted(int(x) for x in table["layer"].dropna().unique())
    if len(layers) > 1:
        low, high = st.select_slider("Layers", options=layers, value=(layers[0], layers[-1]))
    else:
        low, high = (layers[0], layers[0]) if layers else (None, None)
    steps = sorted(int(x) for x in table["step"].dropna().unique())
    chosen_steps = st.multiselect("Steps", steps, default=steps) if steps else []

view = table[table["checkpoint"].isin(checkpoints)]
if low is not None:
    view = view[view["layer"].isna() | view["layer"].between(low, high)]
if steps:
    view = view[view["step"].isna() | view["step"].isin(chosen_steps)]

st.header(f"Figure 2 — magnitude vs direction, {module!r} matrices")
st.plotly_chart(plots.figure2(view, module=module, axis=axis), use_container_width=True)
st.caption("One point per weight matrix and step; colour = layer, marker = step; dashed line = "
           "least squares, r = Pearson. A dotted line, where it falls near the points, is the ΔD "
           "that storage rounding alone produces.")

st.header("Figure 3 — per layer")
fig3_modules = st.multiselect("Module kinds (Figure 3)", modules, default=modules[:3])
log_y = st.toggle("Logarithmic y axes (Figure 3)", value=False,
                  help="FT's changes are ~100× smaller than an adapter's and look flat on linear "
                  "axes")
st.plotly_chart(plots.figure3(view, modules=tuple(fig3_modules) or (module,), axis=axis,
                              log_y=log_y), use_container_width=True)

metric_figures = plots.metric_figures(view, modules=tuple(fig3_modules) or (module,), axis=axis)
if metric_figures:
    st.header("Per-layer metrics")
    st.caption("Every metric of the table beyond ΔM and ΔD, per layer at each checkpoint's last "
               "step: tangential fraction, the spectrum of ΔW (--spectrum), intruder dimensions "
               "(--intruders). The **Drill-down** page shows one matrix in detail.")
    for fig in metric_figures:
        st.plotly_chart(fig, use_container_width=True)

st.header("Correlations")
st.caption("Beside the pooled Pearson r: its 95 % bootstrap interval over layers (r_ci_low, "
           "r_ci_high), the mean r across layers at one step (within_step_r), across steps of "
           "one layer (within_layer_r), and r with each step's mean removed (partial_r).")
st.dataframe(da.correlate(view), hide_index=True, use_container_width=True,
             column_config=cache.number_formats())
