"""Writers for the tables (CSV / JSON / Parquet, atomic) and the readable text summary."""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

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


HTML_SUFFIXES = (".html", ".htm")


def check_output_path(
    path: str | Path, *, inputs: Iterable[str | Path] = (), suffixes: Iterable[str] = TABLE_WRITERS,
) -> Path:
    """Validate an output path before any work: known suffix, existing folder, not an input."""
    path = Path(path)
    suffixes = tuple(suffixes)
    if path.suffix.lower() not in suffixes:
        raise OutputError(f"{path}: unknown output format '{path.suffix}'; use "
                          + ", ".join(suffixes))
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


TABLE_READERS: dict[str, Callable] = {
    ".csv": pd.read_csv,
    ".json": lambda src: pd.read_json(src, orient="records"),
    ".parquet": pd.read_parquet,
}
#: Columns without which a file is not an analysis table.
REQUIRED_COLUMNS = (C.CHECKPOINT, C.MODULE, C.DELTA_M, C.DELTA_D)


def read_table(source: str | Path | IO[bytes], *, name: str | None = None) -> pd.DataFrame:
    """Read a table written by :func:`write_table` (CSV, JSON or Parquet) back.

    ``source`` is a path or an open binary file; ``name`` gives the file name (and so the
    format) of the latter.
    """
    name = name or str(source)
    suffix = Path(name).suffix.lower()
    if suffix not in TABLE_READERS:
        raise OutputError(f"{name}: not a table (use {', '.join(TABLE_READERS)})")
    frame = TABLE_READERS[suffix](source)
    missing = sorted(set(REQUIRED_COLUMNS) - set(frame.columns))
    if missing:
        raise OutputError(f"{name}: not a dora-analysis table (no column {', '.join(missing)})")
    for col in (C.STEP, C.LAYER):
        if col in frame:
            frame[col] = frame[col].astype("Int64")
    return frame


REPORT_MODULE_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "down")


def report_modules(table: pd.DataFrame) -> list[str]:
    """Module kinds in the table, the paper's usual ones first."""
    present = list(dict.fromkeys(table[C.MODULE])) if C.MODULE in table else []
    known = [m for m in REPORT_MODULE_ORDER if m in present]
    return known + [m for m in present if m not in known]


def html_report(table: pd.DataFrame, correlations: pd.DataFrame, *, title: str = "") -> str:
    """A self-contained HTML page: correlations, Figure 2 per module kind, Figure 3, the table."""
    from . import plots  # plotly is only needed for the report

    axes = list(dict.fromkeys(table[C.AXIS])) or ["out"]
    modules = report_modules(table)
    figures = [plots.correlation_figure(correlations)]
    for axis in axes:
        figures += [plots.figure2(table, module=m, axis=axis) for m in modules]
        figures.append(plots.figure3(table, modules=tuple(modules[:3]) or ("q",), axis=axis))
    parts = [fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
             for i, fig in enumerate(figures)]
    checkpoints = ", ".join(dict.fromkeys(table[C.CHECKPOINT])) if len(table) else "none"
    heading = title or f"dora-analysis report: {checkpoints}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(heading)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px} "
        "table.dataframe{border-collapse:collapse;font-size:12px} "
        "table.dataframe td,table.dataframe th{border:1px solid #ccc;padding:2px 6px}</style>"
        f"</head><body><h1>{html.escape(heading)}</h1>"
        "<p>ΔM and ΔD per the DoRA paper (Liu et al., ICML 2024), Eqs. 3–4; one point per weight "
        "matrix and training step. The dotted line marks the ΔD that storage rounding alone "
        "produces.</p>"
        + "\n".join(parts)
        + "<h2>Per-matrix table</h2>"
        + table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
        + "</body></html>\n"
    )


def write_html(table: pd.DataFrame, correlations: pd.DataFrame, path: str | Path,
               *, title: str = "") -> Path:
    """Write :func:`html_report` atomically.

    Example:
        >>> write_html(table, da.correlate(table), "report.html")  # doctest: +SKIP
    """
    path = check_output_path(path, suffixes=HTML_SUFFIXES)
    text = html_report(table, correlations, title=title)
    try:
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


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
