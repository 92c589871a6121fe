"""Writers for the tables (CSV / JSON / Parquet, atomic) and the readable text summary."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from . import columns as C
from .errors import OutputError

#: Table formats by file suffix: adding one means adding a line here.
TABLE_WRITERS: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    ".csv": lambda df, p: df.to_csv(p, index=False),
    ".json": lambda df, p: _write_json_records(df, p),
    ".parquet": lambda df, p: df.to_parquet(p, index=False),
}


def _write_json_records(frame: pd.DataFrame, path: Path) -> None:
    # pandas' to_json rounds floats to 10 digits; json.dumps keeps the shortest exact repr.
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    path.write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")


def check_output_path(path: str | Path, *, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate an output path before any work: known suffix, existing folder, not an input."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_WRITERS:
        raise OutputError(f"{path}: unknown output format '{path.suffix}'; use "
                          + ", ".join(TABLE_WRITERS))
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: folder '{folder}' does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{path}: folder '{folder}' is not writable")
    resolved = path.resolve()
    for item in inputs:
        item = Path(item).resolve()
        if resolved == item or item in resolved.parents:
            raise OutputError(f"{path}: would overwrite or write inside the input '{item}'")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A failure leaves no partial file behind and any existing ``path`` untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".",
                                    prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as CSV, JSON (records) or Parquet, chosen by suffix, atomically.

    Example:
        >>> write_table(table, "deltas.parquet")  # doctest: +SKIP
    """
    path = check_output_path(path)
    writer = TABLE_WRITERS[path.suffix.lower()]
    try:
        return atomic_write(path, lambda tmp: writer(frame, tmp))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`write_table` (CSV, JSON or Parquet) back."""
    path = Path(path)
    readers = {".csv": pd.read_csv, ".json": lambda p: pd.read_json(p, orient="records"),
               ".parquet": pd.read_parquet}
    if path.suffix.lower() not in readers:
        raise OutputError(f"{path}: unknown table format '{path.suffix}'")
    frame = readers[path.suffix.lower()](path)
    for col in (C.STEP, C.LAYER):
        if col in frame:
            frame[col] = frame[col].astype("Int64")
    return frame


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(
        value, spec)


def format_summary(table: pd.DataFrame, correlations: pd.DataFrame) -> str:
    """The CLI's stdout: per checkpoint × module kind, n, mean ΔM, mean ΔD, Pearson r, slope."""
    if correlations.empty:
        return "no weight matrices analysed\n"
    show_axis = correlations[C.AXIS].nunique() > 1
    lines = []
    for label, group in correlations.groupby(C.CHECKPOINT, sort=False):
        rows = table[table[C.CHECKPOINT] == label]
        steps = rows[C.STEP].dropna().unique()
        head = f"{label}  (method: {group[C.METHOD].iloc[0]}"
        head += f", steps: {', '.join(str(int(s)) for s in sorted(steps))})" if len(steps) else ")"
        lines.append(head)
        lines.append(f"  {'module':<12}{'axis  ' if show_axis else ''}{'n':>5}  {'mean ΔM':>11}"
                     f"  {'mean ΔD':>11}  {'Pearson r':>9}  {'slope':>11}")
        for _, r in group.iterrows():
            axis = f"{r[C.AXIS]:<6}" if show_axis else ""
            lines.append(
                f"  {r[C.MODULE]:<12}{axis}{r[C.N]:>5}  {_fmt(r[C.MEAN_DELTA_M], '11.4e')}"
                f"  {_fmt(r[C.MEAN_DELTA_D], '11.4e')}  {_fmt(r[C.PEARSON_R], '+9.3f'):>9}"
                f"  {_fmt(r[C.SLOPE], '+11.4e'):>11}"
            )
        lines.append("")
    return "\n".join(lines)
