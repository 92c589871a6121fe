"""Follow a run: a training run that is still being written, refreshed as checkpoints or rows
appear (only the new checkpoints are analysed)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the app folder, for _cache

import streamlit as st

import _cache
import _live
import dora_analysis as da

FOLLOW_KEY = "follow"

st.title("Follow a run")
st.caption("Open a training run while it is written: a folder of `checkpoint-N/` (analysed "
           "against its base, each new checkpoint once) or the `dora_analysis.parquet` a "
           "`DoraAnalysisCallback` keeps up to date. The Figures and Tables pages show it too.")

try:
    access = _cache.access()
except da.DoraAnalysisError as exc:
    _cache.show_error(exc)
    st.stop()
if access.describe():
    st.info(access.describe())

with st.form("follow_form"):
    run = st.text_input("Run folder",
                        placeholder="runs/dora/   (or runs/dora/dora_analysis.parquet)")
    base = st.text_input("Base checkpoint (for checkpoint-N/ folders)",
                         placeholder="path/to/base/ or org/model@revision")
    cols = st.columns(4)
    method = cols[0].selectbox("Method", ["auto", "ft", "lora", "dora", "unknown"])
    axis = cols[1].radio("Axis", ["out", "in", "both"], horizontal=True)
    modules_text = cols[2].text_input("Module kinds (empty = all)", value="q,v")
    every = cols[3].number_input("Refresh every (s)", min_value=2, max_value=3600, value=10)
    started = st.form_submit_button("Follow", type="primary")

if started:
    try:
        st.session_state[FOLLOW_KEY] = {
            "run": access.resolve(run), "base": access.resolve(base) if base.strip() else "",
            "method": method, "axis": axis, "every": int(every),
            "modules": tuple(m.strip() for m in modules_text.split(",") if m.strip()) or None,
        }
    except da.DoraAnalysisError as exc:
        _cache.show_error(exc)

settings = st.session_state.get(FOLLOW_KEY)
if settings:
    live = st.toggle("Keep refreshing", value=True, key="follow_live",
                     help=f"re-read the run every {settings['every']} s")

    @st.fragment(run_every=settings["every"] if live else None)
    def panel() -> None:
        try:
            snap = _live.follow(settings["run"], settings["base"], method=settings["method"],
                                axis=settings["axis"], modules=settings["modules"],
                                previous=st.session_state.get(_cache.TABLE_KEY))
        except Exception as exc:  # shown in the page, never as a traceback
            _cache.show_error(exc)
            return
        for note in snap.waiting:
            st.info(note)
        for error in snap.errors:
            st.error(error)
        if snap.table is None:
            return
        _cache.set_table(snap.table, f"{snap.source} (followed)")
        steps = snap.steps
        st.success(f"{snap.source}: {len(snap.table)} rows, "
                   + (f"{len(steps)} steps (last {steps[-1]}), " if steps else "")
                   + f"read at {time.strftime('%H:%M:%S')}.")
        left, right = st.columns(2)
        for col, value, title in ((left, "delta_m", "mean ΔM"), (right, "delta_d", "mean ΔD")):
            col.markdown(f"**{title} per step, by module kind**")
            col.line_chart(_live.trend(snap.table, value))

    panel()
