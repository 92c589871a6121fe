"""Caching, uploads and session state for the dashboard (the library itself never imports
streamlit).

Analyses are cached by the *identity* of the files they read — path, size and modification time of
every checkpoint file — so editing or re-saving a checkpoint invalidates the cache, the same
analysis asked twice is instant, and a run that is still being written is re-read only where it
changed. Beneath that in-memory cache, the library's results cache on disk (the one
``dora-analyze`` keeps, ``$XDG_CACHE_HOME/dora-analysis``) is shared: a checkpoint analysed from
the command line, or before a restart, is not computed again.

**Under load** (many sessions at once) memory stays bounded: each in-memory cache holds at most
a fixed number of entries, each for at most :data:`CACHE_TTL_S`; at most
:data:`ANALYSES_AT_ONCE` analyses run at once (the others wait their turn, shown as running);
a session holds at most the one upload its table was analysed from (at most the upload cap).

Every function here that reads takes :class:`~dora_analysis.app.access.Readable` references only
(what passed the access check), never a string. Uploads live in this session's memory while the
table that uses them is loaded (the Drill-down page reads them again) and on disk, in a private
temporary folder (mode 0700), only while they are read; that folder is removed when the server
exits.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import streamlit as st

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.app.access import Access, Readable, current, require
from dora_analysis.hardware import usable_cpus
from dora_analysis.io import formats

#: The repository checkout this package runs from (an editable install); the demo data lives there.
ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "demo-output"
REPRODUCTION_TABLE = ROOT / "docs" / "reproduction" / "table.csv"
CHECKPOINT_SUFFIXES = formats.CHECKPOINT_SUFFIXES  # the format table's, .gguf included
#: Files without a suffix that a checkpoint is read from (DCP metadata, DeepSpeed's tag).
CHECKPOINT_NAMES = (".metadata", "latest")
#: Files a Hugging Face trainer writes beside the weights, which the analysis never reads.
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "training_args.bin", "trainer_state.json",
                 "rng_state.pth"}
TABLE_KEY = "table"
SOURCE_KEY = "source"
UPLOADS_KEY = "uploads"
ADAPTER_UPLOADS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
#: How an uploaded adapter is named in the table's ``ref`` column (and found again by it).
UPLOAD_PREFIX = "upload:"
UPLOAD_LABEL = "uploaded adapter"


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


def identity(source: Readable) -> tuple:
    """The cache key of what ``source`` reads: its files' identity, an upload's content digest."""
    return (source.ref,) if isinstance(source, UploadedAdapter) else file_identity(source.ref)


#: Seconds an in-memory cache entry is kept (a later request computes it again, or finds it in
#: the results cache on disk).
CACHE_TTL_S = 3600
#: Analyses running at once across every session; the others wait for a slot.
ANALYSES_AT_ONCE = usable_cpus()
_analysis_slots = threading.BoundedSemaphore(ANALYSES_AT_ONCE)


@st.cache_data(show_spinner=False, max_entries=32, ttl=CACHE_TTL_S)
def _analyze(label: str, method: str, axis: str, modules: tuple[str, ...] | None,
             identity: tuple, _base: Readable, _tuned: Readable) -> pd.DataFrame:
    # ``identity`` is the cache key; the underscored sources are not hashed by streamlit.
    # An upload is read from a new temporary folder each time: not worth a results-cache entry.
    cache = None if isinstance(_tuned, UploadedAdapter) else True
    with _analysis_slots, _base.opened() as base, _tuned.opened() as tuned:
        table = da.analyze(base, tuned, labels=[label] if label else None, methods=[method],
                           axis=axis, modules=modules, cache=cache)
    if isinstance(_tuned, UploadedAdapter):  # not the temporary folder, gone by now
        table[C.REF] = _tuned.ref
    return table


def analyze(base: Readable, tuned: Readable, label: str, method: str, axis: str,
            modules: tuple[str, ...] | None) -> pd.DataFrame:
    """One tuned reference against its base, cached by file identity."""
    key = (identity(require(base)), identity(require(tuned)))
    return _analyze(label, method, axis, modules, key, base, tuned)


def check_tuned(tuned: Sequence[Readable], labels: Sequence[str | None], method: str) -> None:
    """The checks ``dora-analyze`` makes of its TUNED references and ``--label``s, with its
    messages (two references with one label at one step are refused, …), before any work."""
    from dora_analysis.plan import expand_tuned

    with ExitStack() as stack:
        refs = [stack.enter_context(require(t).opened()) for t in tuned]
        expand_tuned(refs, list(labels), [method])


@st.cache_data(show_spinner="Reading the matrix and computing its SVDs…", max_entries=16,
               ttl=CACHE_TTL_S)
def _matrix_detail(name: str, axis: str, expert: int | None, k: int, eps: float,
                   identity: tuple, _base: Readable, _tuned: Readable):
    with _analysis_slots, _base.opened() as base, _tuned.opened() as tuned:
        detail = da.matrix_detail(base, tuned, name, axis=axis, expert=expert, intruder_k=k,
                                  intruder_eps=eps)
    if isinstance(_tuned, UploadedAdapter):  # not the temporary folder, gone by now
        detail = dataclasses.replace(detail, checkpoint=_tuned.ref)
    return detail


def matrix_detail(base: Readable, tuned: Readable, name: str, *, axis: str,
                  expert: int | None, k: int, eps: float):
    """:func:`dora_analysis.matrix_detail`, cached by file identity (re-saved files are read
    again)."""
    key = (identity(require(base)), identity(require(tuned)))
    return _matrix_detail(name, axis, expert, k, eps, key, base, tuned)


@st.cache_data(show_spinner="Comparing the runs matrix by matrix…", max_entries=8,
               ttl=CACHE_TTL_S)
def _compare_runs(labels: tuple[str, ...], modules: tuple[str, ...] | None, k: int, trim: float,
                  identity: tuple, _base: Readable, _runs: tuple[Readable, ...]) -> pd.DataFrame:
    with _analysis_slots, ExitStack() as stack:
        base = stack.enter_context(_base.opened())
        runs = [stack.enter_context(r.opened()) for r in _runs]
        return da.compare_runs(base, runs, labels=list(labels), modules=modules, k=k,
                               trim=trim)


def compare_runs(base: Readable, runs: Sequence[Readable], labels: Sequence[str],
                 modules: tuple[str, ...] | None, k: int, trim: float) -> pd.DataFrame:
    """:func:`dora_analysis.compare_runs`, cached by the identity of every file it reads."""
    key = (identity(require(base)), *(identity(require(r)) for r in runs))
    return _compare_runs(tuple(labels), modules, k, trim, key, base, tuple(runs))


def last_step_refs(table: pd.DataFrame) -> dict[str, str]:
    """Checkpoint label → the ``ref`` of its last step (a single checkpoint: its own)."""
    steps = table[C.STEP].astype("float64").fillna(-1)
    last = table[steps == steps.groupby(table[C.CHECKPOINT]).transform("max")]
    return dict(zip(last[C.CHECKPOINT], last[C.REF].astype(str), strict=False))


def read_uploaded_cross_run(name: str, data: bytes) -> pd.DataFrame:
    """A cross-run table uploaded as CSV, JSON or Parquet."""
    return da.read_table(io.BytesIO(data), name=name, kind="cross_run")


@st.cache_data(show_spinner=False, max_entries=16, ttl=CACHE_TTL_S)
def _read_table(path: str, identity: tuple) -> pd.DataFrame:
    del identity  # part of the cache key only
    return da.read_table(path)


def read_table_file(source: Readable) -> pd.DataFrame:
    """A table file, re-read only when its size or modification time changed."""
    return _read_table(require(source).ref, file_identity(source.ref))


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


@dataclass(frozen=True, eq=False)
class UploadedAdapter(Readable):
    """An adapter uploaded in this session: its files in memory, on disk only while read."""

    files: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    @contextmanager
    def opened(self) -> Iterator[str]:
        folder = Path(tempfile.mkdtemp(prefix="adapter-", dir=upload_root()))
        try:
            for name, data in self.files:
                (folder / name).write_bytes(data)
            yield str(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def uploaded_adapter(files) -> UploadedAdapter:
    """Uploaded adapter files (adapter_config.json + weights), checked; :func:`set_table` keeps
    them in the session while a table that uses them is loaded (see :func:`table_source`)."""
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
    contents = tuple(sorted((f.name, f.getvalue()) for f in files))
    digest = hashlib.sha256()
    for name, data in contents:
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return UploadedAdapter(f"{UPLOAD_PREFIX}{digest.hexdigest()[:16]}", contents)


def table_source(access: Access, ref: str) -> Readable:
    """What a table's ``ref`` names, for reading it again: an adapter uploaded in this session,
    else the path or Hub id through the access check."""
    if ref.startswith(UPLOAD_PREFIX):
        adapter = st.session_state.get(UPLOADS_KEY, {}).get(ref)
        if adapter is None:
            raise da.DoraAnalysisError(
                "this row's adapter was uploaded, and uploads are kept only in the session that "
                "analysed them, while its table is loaded; upload it again on the Data page")
        return adapter
    return access.resolve(ref)


def demo_table() -> tuple[pd.DataFrame, str]:
    """The table of `make demo` if it was run, else the full experiment's (docs/reproduction.md),
    with a label saying which."""
    if (DEMO_DIR / "table.csv").is_file():
        return da.read_table(DEMO_DIR / "table.csv"), "demo data (make demo)"
    if not REPRODUCTION_TABLE.is_file():  # an installed wheel: the demo data is the repository's
        raise da.DoraAnalysisError("the demo data comes with a clone of the repository (make demo);"
                                   " here, analyse your checkpoints or open a saved table")
    return da.read_table(REPRODUCTION_TABLE), "docs/reproduction.md: 5 seeds × FT/LoRA/DoRA"


def access() -> Access:
    """What visitors may read, from the server's address and the data root it was given."""
    return current(st.get_option("server.address"))


def set_table(table: pd.DataFrame, source: str,
              uploads: Sequence[UploadedAdapter] = ()) -> None:
    """Make ``table`` the session's table, keeping the uploads it was analysed from (and no
    other: memory holds only what the table can be drilled into)."""
    st.session_state[TABLE_KEY] = table
    st.session_state[SOURCE_KEY] = source
    used = set(table[C.REF].astype(str)) if C.REF in table else set()
    held = {**st.session_state.get(UPLOADS_KEY, {}), **{a.ref: a for a in uploads}}
    st.session_state[UPLOADS_KEY] = {ref: a for ref, a in held.items() if ref in used}


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
    """Scientific notation for the small numbers (ΔM, ΔD, p-values) in st.dataframe; four
    significant digits for the drill-down's per-vector numbers (``%g``: scientific where small,
    so 1 − cos ≈ 3e-4 keeps its digits)."""
    columns = ("delta_m", "delta_d", "mean_m0", "p_value", "slope", "intercept", "mean_delta_m",
               "mean_delta_d")
    formats = {c: st.column_config.NumberColumn(format="%.3e") for c in columns}
    vectors = ("m0", "mt", "one_minus_cos", "tangential_share")
    return formats | {c: st.column_config.NumberColumn(format="%.4g") for c in vectors}


def show_error(exc: BaseException) -> None:
    """A readable message in the page, never a stack trace."""
    if isinstance(exc, da.DoraAnalysisError):
        st.error(str(exc))
    else:
        st.error(f"unexpected error ({type(exc).__name__}): {exc}")
