"""Caching and session state for the dashboard (the library itself never imports streamlit).

Analyses are cached by the *identity* of the files they read — path, size and modification time of
every checkpoint file — so editing or re-saving a checkpoint invalidates the cache, and the same
analysis asked twice is instant.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

import dora_analysis as da

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "demo-output"
REPRODUCTION_TABLE = ROOT / "docs" / "reproduction" / "table.csv"
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".distcp")
#: Files without a suffix that a checkpoint is read from (DCP metadata, DeepSpeed's tag).
CHECKPOINT_NAMES = (".metadata", "latest")
TABLE_KEY = "table"
SOURCE_KEY = "source"


def file_identity(ref: str) -> tuple:
    """(path, size, mtime) of each checkpoint file a reference reads; a Hub id is its own key."""
    path = Path(ref).expanduser()
    if not path.exists():
        return (ref,)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if (p.suffix in CHECKPOINT_SUFFIXES or p.name in CHECKPOINT_NAMES) and p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@st.cache_data(show_spinner=False, max_entries=64)
def _analyze(base: str, tuned: str, label: str, method: str, axis: str,
             modules: tuple[str, ...] | None, identity: tuple) -> pd.DataFrame:
    del identity  # part of the cache key only
    return da.analyze(base, tuned, labels=[label] if label else None, methods=[method],
                      axis=axis, modules=modules)


def analyze(base: str, tuned: str, label: str, method: str, axis: str,
            modules: tuple[str, ...] | None) -> pd.DataFrame:
    """One tuned reference against its base, cached by file identity."""
    identity = (file_identity(base), file_identity(tuned))
    return _analyze(base, tuned, label, method, axis, modules, identity)


def read_uploaded_table(name: str, data: bytes) -> pd.DataFrame:
    """A table uploaded as CSV, JSON or Parquet."""
    return da.read_table(io.BytesIO(data), name=name)


def save_uploaded_adapter(files) -> Path:
    """Uploaded adapter files (adapter_config.json + weights) in a private temporary folder."""
    names = {f.name for f in files}
    if "adapter_config.json" not in names:
        raise da.DoraAnalysisError("upload adapter_config.json together with the adapter weights")
    folder = Path(tempfile.mkdtemp(prefix="dora-adapter-"))
    for f in files:
        (folder / Path(f.name).name).write_bytes(f.getvalue())
    return folder


def demo_table() -> tuple[pd.DataFrame, str]:
    """The table of `make demo` if it was run, else the full experiment's (docs/reproduction.md),
    with a label saying which."""
    if (DEMO_DIR / "table.csv").is_file():
        return da.read_table(DEMO_DIR / "table.csv"), "demo data (make demo)"
    return da.read_table(REPRODUCTION_TABLE), "docs/reproduction.md: 5 seeds × FT/LoRA/DoRA"


def set_table(table: pd.DataFrame, source: str) -> None:
    st.session_state[TABLE_KEY] = table
    st.session_state[SOURCE_KEY] = source


def current_table() -> pd.DataFrame | None:
    """The table loaded in this session; at start-up, the one named by DORA_DASHBOARD_TABLE."""
    if TABLE_KEY not in st.session_state and os.environ.get("DORA_DASHBOARD_TABLE"):
        path = os.environ["DORA_DASHBOARD_TABLE"]
        try:
            set_table(da.read_table(path), path)
        except (OSError, ValueError, da.DoraAnalysisError) as exc:
            st.error(f"could not open {path}: {exc}")
            return None
    return st.session_state.get(TABLE_KEY)


def number_formats() -> dict:
    """Scientific notation for the small numbers (ΔM, ΔD, p-values) in st.dataframe."""
    columns = ("delta_m", "delta_d", "mean_m0", "p_value", "slope", "intercept", "mean_delta_m",
               "mean_delta_d")
    return {c: st.column_config.NumberColumn(format="%.3e") for c in columns}


def show_error(exc: BaseException) -> None:
    """A readable message in the page, never a stack trace."""
    if isinstance(exc, da.DoraAnalysisError):
        st.error(str(exc))
    else:
        st.error(f"unexpected error ({type(exc).__name__}): {exc}")
