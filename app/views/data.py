"""Data: load the demo, analyse checkpoints (paths, Hub ids, uploaded adapters), open a table.

Typed references go through :mod:`_access` (a data root confines them when one is named);
uploaded adapters exist on the server only while they are analysed.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the app folder, for _cache

import pandas as pd
import streamlit as st

import _cache
import dora_analysis as da

st.title("dora-analysis")
st.caption("How fine-tuning moved your weights, in magnitude (ΔM) and direction (ΔD) — "
           "DoRA paper, Eqs. 2–4 and Figures 2–3.")

table = _cache.current_table()
if table is not None:
    st.success(f"Loaded: {st.session_state.get(_cache.SOURCE_KEY)} — {len(table)} rows, "
               f"checkpoints {', '.join(map(str, dict.fromkeys(table['checkpoint'])))}. "
               "Open **Figures** or **Tables**.")

st.subheader("Demo data")
if st.button("Load the demo data", help="all-MiniLM-L6-v2 fine-tuned with FT, LoRA and DoRA: "
             "the output of `make demo` if you ran it, else the full experiment of "
             "docs/reproduction.md"):
    try:
        _cache.set_table(*_cache.demo_table())
        st.rerun()
    except Exception as exc:  # shown in the page, never as a traceback
        _cache.show_error(exc)

st.subheader("Analyse checkpoints")
try:
    access = _cache.access()
except da.DoraAnalysisError as exc:  # a data root that is not a folder: nothing is read
    _cache.show_error(exc)
    st.stop()
if access.describe():
    st.info(access.describe())
with st.form("analyse"):
    base = st.text_input("Base checkpoint", placeholder="path/to/base/ or org/model@revision")
    tuned_text = st.text_area(
        "Tuned checkpoints, one per line (optionally `label = reference`)",
        placeholder="FT = runs/ft\nDoRA = runs/dora/   (a folder of checkpoint-N/ is a series)")
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
        refs = []
        for line in tuned_text.splitlines():
            if line.strip():
                label, _, ref = line.partition("=") if "=" in line else ("", "", line)
                refs.append((label.strip(), access.resolve(ref)))
        if not base.strip() or not (refs or uploads):
            raise da.DoraAnalysisError("give a base checkpoint and at least one tuned checkpoint")
        base_ref = access.resolve(base)
        modules = tuple(m.strip() for m in modules_text.split(",") if m.strip()) or None
        with _cache.uploaded_adapter(uploads) if uploads else nullcontext() as adapter:
            if adapter is not None:
                refs.append(("uploaded adapter", str(adapter)))
            progress = st.progress(0.0, text="starting…")
            frames = []
            for i, (label, ref) in enumerate(refs):
                progress.progress(i / len(refs),
                                  text=f"analysing {label or ref} ({i + 1}/{len(refs)})")
                frames.append(_cache.analyze(base_ref, ref, label, method, axis, modules))
            progress.progress(1.0, text="done")
        _cache.set_table(pd.concat(frames, ignore_index=True), f"analysis of {base.strip()}")
        st.rerun()
    except Exception as exc:  # shown in the page, never as a traceback
        _cache.show_error(exc)

st.subheader("Open a saved table")
upload = st.file_uploader("A table written by dora-analyze -o (CSV, JSON or Parquet)",
                          type=["csv", "json", "parquet"], key="table_upload")
if upload is not None:
    try:
        _cache.set_table(_cache.read_uploaded_table(upload.name, upload.getvalue()), upload.name)
        st.success(f"Loaded {upload.name}. Open **Figures** or **Tables**.")
    except Exception as exc:  # shown in the page, never as a traceback
        _cache.show_error(exc)
