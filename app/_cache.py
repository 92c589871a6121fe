"""Caching, uploads and session state for the dashboard (the library itself never imports
streamlit).

Analyses are cached by the *identity* of the files they read — path, size and modification time of
every checkpoint file — so editing or re-saving a checkpoint invalidates the cache, the same
analysis asked twice is instant, and a run that is still being written is re-read only where it
changed. Uploads live in a private temporary folder (mode 0700) that is emptied after each
analysis and removed when the server exits.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import streamlit as st

import _access
import dora_analysis as da

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "demo-output"
REPRODUCTION_TABLE = ROOT / "docs" / "reproduction" / "table.csv"
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".distcp")
#: Files without a suffix that a checkpoint is read from (DCP metadata, DeepSpeed's tag).
CHECKPOINT_NAMES = (".metadata", "latest")
#: Files a Hugging Face trainer writes beside the weights, which the analysis never reads.
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "training_args.bin", "trainer_state.json",
                 "rng_state.pth"}
TABLE_KEY = "table"
SOURCE_KEY = "source"
ADAPTER_UPLOADS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _stat(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:  # removed meanwhile (a trainer rotating checkpoints)
        return None
    return str(path), st.st_size, st.st_mtime_ns


def file_identity(ref: str) -> tuple:
    """(path, size, mtime) of each checkpoint file a reference reads; a Hub id is its own key."""
    path = Path(ref).expanduser()
    if not path.exists():
        return (ref,)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if (p.suffix in CHECKPOINT_SUFFIXES or p.name in CHECKPOINT_NAMES) and p.is_file()
        and p.name not in TRAINER_STATE and not p.name.startswith("rng_state"))
    return tuple(i for i in map(_stat, files) if i is not None)


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


@st.cache_data(show_spinner=False, max_entries=16)
def _read_table(path: str, identity: tuple) -> pd.DataFrame:
    del identity  # part of the cache key only
    return da.read_table(path)


def read_table_file(path: str) -> pd.DataFrame:
    """A table file, re-read only when its size or modification time changed."""
    return _read_table(path, file_identity(path))


def read_uploaded_table(name: str, data: bytes) -> pd.DataFrame:
    """A table uploaded as CSV, JSON or Parquet."""
    return da.read_table(io.BytesIO(data), name=name)


_upload_root: Path | None = None


def upload_root() -> Path:
    """This server's private folder for uploads (0700), removed when the process exits."""
    global _upload_root
    if _upload_root is None or not _upload_root.is_dir():
        _upload_root = Path(tempfile.mkdtemp(prefix="dora-dashboard-"))
        atexit.register(shutil.rmtree, _upload_root, ignore_errors=True)
    return _upload_root


def upload_limit() -> int:
    """Bytes one upload (all its files together) may hold: Streamlit's per-file cap."""
    return int(st.get_option("server.maxUploadSize")) << 20


@contextmanager
def uploaded_adapter(files) -> Iterator[Path]:
    """Uploaded adapter files (adapter_config.json + weights) as a folder, for the duration of
    the ``with`` block; nothing of them stays on the server afterwards."""
    names = [f.name for f in files]
    unknown = sorted(set(names) - set(ADAPTER_UPLOADS))
    if unknown or "adapter_config.json" not in names or len(set(names)) != len(names):
        raise da.DoraAnalysisError(
            "upload an adapter as adapter_config.json plus adapter_model.safetensors (or .bin)"
            + (f"; not {', '.join(unknown)}" if unknown else ""))
    total = sum(f.size for f in files)
    if total > upload_limit():
        raise da.DoraAnalysisError(f"the upload is {total >> 20} MiB, more than this dashboard "
                                   f"takes ({upload_limit() >> 20} MiB); give a path instead")
    folder = Path(tempfile.mkdtemp(prefix="adapter-", dir=upload_root()))
    try:
        for f in files:
            (folder / f.name).write_bytes(f.getvalue())
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def demo_table() -> tuple[pd.DataFrame, str]:
    """The table of `make demo` if it was run, else the full experiment's (docs/reproduction.md),
    with a label saying which."""
    if (DEMO_DIR / "table.csv").is_file():
        return da.read_table(DEMO_DIR / "table.csv"), "demo data (make demo)"
    return da.read_table(REPRODUCTION_TABLE), "docs/reproduction.md: 5 seeds × FT/LoRA/DoRA"


def access() -> _access.Access:
    """What visitors may read, from the server's address and the data root it was given."""
    return _access.current(st.get_option("server.address"))


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
