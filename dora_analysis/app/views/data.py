"""Data: load the demo, analyse checkpoints (paths, Hub ids, uploaded adapters), open a table.

Typed references go through :mod:`dora_analysis.app.access` (a data root confines them when
one is named) and are read as ``dora-analyze`` reads its TUNED arguments, with its ``--label``
rules; uploaded adapters stay in the session's memory while their table is loaded, on disk only
while read.
"""


import pandas as pd
import streamlit as st

import dora_analysis as da
from dora_analysis.app import cache
from dora_analysis.plan import per_reference

st.title("dora-analysis")
st.caption("How fine-tuning moved your weights, in magnitude (ΔM) and direction (ΔD) — "
           "DoRA paper, Eqs. 2–4 and Figures 2–3.")

table = cache.current_table()
if table is not None:
    st.success(f"Loaded: {st.session_state.get(cache.SOURCE_KEY)} — {len(table)} rows, "
               f"checkpoints {', '.join(map(str, dict.fromkeys(table['checkpoint'])))}. "
               "Open **Figures** or **Tables**.")

st.subheader("Demo data")
if st.button("Load the demo data", help="all-MiniLM-L6-v2 fine-tuned with FT, LoRA and DoRA: "
             "the output of `make demo` if you ran it, else the full experiment of "
             "docs/reproduction.md"):
    try:
        cache.set_table(*cache.demo_table())
        st.rerun()
    except Exception as exc:  # shown in the page, never as a traceback
        cache.show_error(exc)

st.subheader("Analyse checkpoints")
try:
    access = cache.access()
except da.DoraAnalysisError as exc:  # a data root that is not a folder: nothing is read
    cache.show_error(exc)
    st.stop()
if access.describe():
    st.info(access.describe())
with st.form("analyse"):
    base = st.text_input("Base checkpoint", placeholder="path/to/base/ or org/model@revision")
    left, right = st.columns([3, 1])
    tuned_text = left.text_area(
        "Tuned checkpoints, one reference per line (as dora-analyze's TUNED)",
        placeholder="runs/ft\nruns/dora/   (a folder of checkpoint-N/ is a series)")
    labels_text = right.text_area(
        "Labels (as --label)", placeholder="FT\nDoRA",
        help="one per reference, or one for all; empty: each from its path")
    uploads = st.file_uploader("…or upload a small adapter (adapter_config.json + weights)",
                               accept_multiple_files=True,
                               type=["json", "safetensors", "bin"])
    cols = st.columns(3)
    method = cols[0].selectbox("Method", ["auto", "ft", "lora", "dora", "unknown"])
    axis = cols[1].radio("Axis", ["out", "in", "both"], horizontal=True)
    modules_text = cols[2].text_input("Module kinds (empty = all)", value="q,v")
    submitted = st.form_submit_button("Run analysis", type="primary")

if submitted:
    try:
        # A line is one reference, whatever it holds ('=' included), as on the command line.
        lines = [line.strip() for line in tuned_text.splitlines() if line.strip()]
        if not base.strip() or not (lines or uploads):
            raise da.DoraAnalysisError("give a base checkpoint and at least one tuned checkpoint")
        tuned = [access.resolve(line) for line in lines]
        base_ref = access.resolve(base)
        labels = per_reference([line.strip() for line in labels_text.splitlines()
                                if line.strip()], len(tuned), "--label", None)
        adapters = [cache.uploaded_adapter(uploads)] if uploads else []
        tuned += adapters
        labels += [cache.UPLOAD_LABEL] * len(adapters)
        cache.check_tuned(tuned, labels, method)  # the CLI's checks: one label per series …
        modules = tuple(m.strip() for m in modules_text.split(",") if m.strip()) or None
        progress = st.progress(0.0, text="starting…")
        frames = []
        for i, (source, label) in enumerate(zip(tuned, labels, strict=True)):
            progress.progress(i / len(tuned),
                              text=f"analysing {label or source.ref} ({i + 1}/{len(tuned)})")
            frames.append(cache.analyze(base_ref, source, label or "", method, axis, modules))
        progress.progress(1.0, text="done")
        cache.set_table(pd.concat(frames, ignore_index=True), f"analysis of {base.strip()}",
                         uploads=adapters)
        st.rerun()
    except Exception as exc:  # shown in the page, never as a traceback
        cache.show_error(exc)

st.subheader("Open a saved table")
upload = st.file_uploader("A table written by dora-analyze -o (CSV, JSON or Parquet)",
                          type=["csv", "json", "parquet"], key="table_upload")
if upload is not None:
    try:
        cache.set_table(cache.read_uploaded_table(upload.name, upload.getvalue()), upload.name)
        st.success(f"Loaded {upload.name}. Open **Figures** or **Tables**.")
    except Exception as exc:  # shown in the page, never as a traceback
        cache.show_error(exc)
