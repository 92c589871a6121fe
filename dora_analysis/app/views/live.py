"""Follow a run: a training run that is still being written, refreshed as checkpoints or rows
appear (only the new checkpoints are analysed; those the trainer deletes keep their rows). The
run folder and the base go through the access check at every refresh."""

import time

import streamlit as st

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis import plots
from dora_analysis.app import cache, follow

FOLLOW_KEY = "follow"
ROWS_KEY = "follow_rows"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


st.title("Follow a run")
st.caption("Open a training run while it is written: a folder of `checkpoint-N/` (analysed "
           "against its base, each new checkpoint once) or the `dora_analysis.parquet` a "
           "`DoraAnalysisCallback` keeps up to date. The Figures and Tables pages show it too.")

try:
    access = cache.access()
except da.DoraAnalysisError as exc:
    cache.show_error(exc)
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
    try:  # checked now, for the message; and again at every refresh (new checkpoints included)
        access.resolve(run)
        if base.strip():
            access.resolve(base)
        st.session_state[FOLLOW_KEY] = {
            "run": run, "base": base, "method": method, "axis": axis, "every": int(every),
            "modules": tuple(m.strip() for m in modules_text.split(",") if m.strip()) or None,
        }
    except da.DoraAnalysisError as exc:
        st.session_state.pop(FOLLOW_KEY, None)
        cache.show_error(exc)


def memory(key: tuple) -> follow.RunRows:
    """The rows already read of this run with these settings (kept across refreshes, so that
    checkpoints the trainer deletes keep their rows)."""
    kept = st.session_state.get(ROWS_KEY)
    if kept is None or kept.key != key:
        kept = st.session_state[ROWS_KEY] = follow.RunRows(key)
    return kept


settings = st.session_state.get(FOLLOW_KEY)
if settings:
    live = st.toggle("Keep refreshing", value=True, key="follow_live",
                     help=f"re-read the run every {settings['every']} s")

    @st.fragment(run_every=settings["every"] if live else None)
    def panel() -> None:
        try:
            run = access.resolve(settings["run"])
            base = access.resolve(settings["base"]) if settings["base"].strip() else None
            key = (run.ref, base and base.ref, settings["method"], settings["axis"],
                   settings["modules"])
            snap = follow.follow(run, base, method=settings["method"], axis=settings["axis"],
                                modules=settings["modules"], memory=memory(key))
        except Exception as exc:  # shown in the page, never as a traceback
            cache.show_error(exc)
            return
        for note in snap.waiting:
            st.info(note)
        for error in snap.errors:
            st.error(error)
        if snap.table is None:
            return
        cache.set_table(snap.table, f"{snap.source} (followed)")
        steps = snap.steps
        st.success(f"{snap.source}: {len(snap.table)} rows, "
                   + (f"{plural(len(steps), 'step')} (last {steps[-1]}), " if steps else "")
                   + f"read at {time.strftime('%H:%M:%S')}.")
        for note in (follow.rotated_note(snap.rotated), follow.vanished_note(snap.vanished)):
            if note:
                st.caption(note)
        axes = set(snap.table[C.AXIS])
        shown = settings["axis"] if settings["axis"] in axes else sorted(axes)[0]
        st.plotly_chart(plots.step_trend(snap.table, axis=shown), width="stretch")

    panel()
