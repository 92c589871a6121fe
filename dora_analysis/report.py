"""Writers: the tables (CSV / JSON / Parquet), the HTML report and the readable text summary.

Every file is written all-or-nothing (:mod:`dora_analysis.atomic`); :func:`write_outputs` writes
the table, the correlations and the report of one run together, so that a failure leaves none of
them. Tables are read back by :mod:`dora_analysis.tables`.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from . import columns as C
from .atomic import Writer, write_all
from .errors import OutputError
from .io.guard import path_kind, shown

if TYPE_CHECKING:  # the writers take pandas frames; this module loads without pandas (the CLI
    import pandas as pd  # checks its outputs before the analysis, and imports pandas meanwhile)

#: Table formats by file suffix: adding one means adding a line here.
TABLE_WRITERS: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    # text quoted: a bare carriage return in a label would otherwise end the row
    ".csv": lambda df, p: df.to_csv(p, index=False, quoting=csv.QUOTE_NONNUMERIC),
    ".json": lambda df, p: _write_json_records(df, p),
    ".parquet": lambda df, p: df.to_parquet(p, index=False),
}


def _write_json_records(frame: pd.DataFrame, path: Path) -> None:
    # pandas' to_json rounds floats to 10 digits; json.dumps keeps the shortest exact repr.
    from .tables import JSON_INFINITIES

    # JSON has no infinities: they are written as the strings of JSON_INFINITIES, NaN/NA as null.
    names = {v: k for k, v in JSON_INFINITIES.items()}
    records = [{k: names[v] if isinstance(v, float) and math.isinf(v) else v for k, v in r.items()}
               for r in frame.astype(object).where(frame.notna(), None).to_dict("records")]
    path.write_text(json.dumps(records, indent=1, allow_nan=False) + "\n", encoding="utf-8")


HTML_SUFFIXES = (".html", ".htm")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_output_path(
    path: str | Path, *, inputs: Iterable[str | Path] = (), suffixes: Iterable[str] = TABLE_WRITERS,
) -> Path:
    """Validate an output path before any work: known suffix, existing folder, a name the file
    system can hold, not a special file, not an input."""
    path = Path(path)
    suffixes = tuple(suffixes)
    if path.suffix.lower() not in suffixes:
        raise OutputError(f"{shown(path)}: unknown output format '{shown(path.suffix)}'; use "
                          + ", ".join(suffixes))
    folder = path.parent if str(path.parent) else Path(".")
    if path_kind(folder) != "folder":
        # the nearest part of the path that exists says why: a file where a folder should be
        there = next((p for p in (folder, *folder.parents) if path_kind(p) is not None), None)
        if there is not None and path_kind(there) != "folder":
            raise OutputError(f"{shown(path)}: '{shown(there)}' is a file, not a folder; "
                              "choose an output path in a folder")
        raise OutputError(f"{shown(path)}: folder '{shown(folder)}' does not exist (or is "
                          "unreachable); create it first")
    size, limit = len(os.fsencode(path.name)), _name_max(folder)
    if size > limit:
        raise OutputError(f"{shown(path)}: the file name is {size} bytes, longer than the file "
                          f"system allows ({limit}); choose a shorter name")
    kind = path_kind(path)
    if kind == "folder":
        raise OutputError(f"{shown(path)}: is a folder; give a file name")
    if kind == "other":
        raise OutputError(f"{shown(path)}: is not a regular file (a FIFO, socket or device); "
                          "give a file name")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{shown(path)}: folder '{shown(folder)}' is not writable")
    resolved = path.resolve()
    for item in inputs:
        item = Path(item).resolve()
        if resolved == item or item in resolved.parents:
            raise OutputError(f"{shown(path)}: would overwrite or write inside the input "
                              f"'{shown(item)}'")
    return path


def atomic_write(path: str | Path, write: Writer) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A failure leaves no partial file behind and any existing ``path`` untouched.
    """
    return write_all([(Path(path), write)])[0]


def _table_writer(frame: pd.DataFrame, path: Path) -> Writer:
    writer = TABLE_WRITERS[path.suffix.lower()]
    return lambda tmp: writer(frame, tmp)


def _html_writer(table: pd.DataFrame, correlations: pd.DataFrame, title: str,
                 cross_run: pd.DataFrame | None = None) -> Writer:
    return lambda tmp: tmp.write_text(html_report(table, correlations, title=title,
                                                  cross_run=cross_run), encoding="utf-8")


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as CSV, JSON (records) or Parquet, chosen by suffix, atomically.

    Example:
        >>> write_table(table, "deltas.parquet")  # doctest: +SKIP
    """
    path = check_output_path(path)
    return atomic_write(path, _table_writer(frame, path))


def write_outputs(
    table: pd.DataFrame, correlations: pd.DataFrame, *, output: str | Path | None = None,
    summary: str | Path | None = None, html: str | Path | None = None, title: str = "",
    inputs: Iterable[str | Path] = (), cross_run: str | Path | None = None,
    cross_run_table: pd.DataFrame | None = None,
) -> list[Path]:
    """Write the table (``output``), the correlations (``summary``), the HTML report (``html``)
    and the cross-run table (``cross_run``, from ``cross_run_table``, whose heatmaps the report
    then shows) — those given — all or none of them (see :mod:`dora_analysis.atomic`).

    Example:
        >>> write_outputs(table, correlate(table), output="t.csv", html="r.html")  # doctest: +SKIP
    """
    check_outputs(output=output, summary=summary, html=html, cross_run=cross_run, inputs=inputs)
    if cross_run and cross_run_table is None:
        raise ValueError("cross_run names a file but no cross_run_table was given")
    jobs: list[tuple[Path, Writer]] = []
    for path, frame in ((output, table), (summary, correlations), (cross_run, cross_run_table)):
        if path:
            jobs.append((Path(path), _table_writer(frame, Path(path))))
    if html:
        jobs.append((Path(html), _html_writer(table, correlations, title, cross_run_table)))
    return write_all(jobs)


def check_outputs(*, output=None, summary=None, html=None, cross_run=None,
                  inputs: Iterable = ()) -> None:
    """Validate the output paths of one run before any work (see :func:`check_output_path`)."""
    inputs = list(inputs)
    for path in (output, summary, cross_run):
        if path:
            check_output_path(path, inputs=inputs)
    if html:
        check_output_path(html, inputs=inputs, suffixes=HTML_SUFFIXES)
    given = [Path(p) for p in (output, summary, html, cross_run) if p]
    if len({p.resolve() for p in given}) < len(given):
        raise OutputError("-o, --summary, --html and --cross-run name the same file; give "
                          "different files")


REPORT_MODULE_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "down")


def report_modules(table: pd.DataFrame) -> list[str]:
    """Module kinds in the table, the paper's usual ones first."""
    present = list(dict.fromkeys(table[C.MODULE])) if C.MODULE in table else []
    known = [m for m in REPORT_MODULE_ORDER if m in present]
    return known + [m for m in present if m not in known]


def warning_lines(table: pd.DataFrame) -> list[str]:
    """One line per checkpoint and health check that fired (the ``warnings`` column): what, how
    many matrices (rows of a series count once per step), and the first names.

    Example:
        >>> warning_lines(table)  # doctest: +SKIP
        ['run: adapter never trained (lora_B is all zeros) [lora_B_zero]: 4 matrices (…)']
    """
    from .metrics.health import CHECKS, WARNINGS, split

    if WARNINGS not in table or table.empty:
        return []
    tags = [split(cell) for cell in table[WARNINGS]]
    lines = []
    for label in dict.fromkeys(table[C.CHECKPOINT]):
        for tag, sentence in CHECKS.items():
            hit = table[[ck == label and tag in t
                         for ck, t in zip(table[C.CHECKPOINT], tags, strict=True)]]
            if hit.empty:
                continue
            names = list(dict.fromkeys(hit[C.NAME])) if C.NAME in hit else []
            shown = ", ".join(names[:3]) + (f" … and {len(names) - 3} more" if len(names) > 3
                                             else "")
            lines.append(f"{label}: {sentence} [{tag}]: {len(hit)} row(s) ({shown})")
    return lines


def html_report(table: pd.DataFrame, correlations: pd.DataFrame, *, title: str = "",
                cross_run: pd.DataFrame | None = None) -> str:
    """A self-contained HTML page: health warnings, correlations with their diagnostics, Figure 2
    per module kind, Figure 3, a figure per registry metric the table holds, the table; with a
    cross-run table (:func:`dora_analysis.compare_runs`), its overview and per-pair heatmaps
    of each of the four measures."""
    from . import heatmaps, plots  # plotly is only needed for the report

    axes = list(dict.fromkeys(table[C.AXIS])) or ["out"]
    modules = report_modules(table)
    figures = [plots.correlation_figure(correlations)]
    for axis in axes:
        figures += [plots.figure2(table, module=m, axis=axis) for m in modules]
        figures.append(plots.figure3(table, modules=tuple(modules[:3]) or ("q",), axis=axis))
        figures += plots.metric_figures(table, modules=tuple(modules[:3]) or None, axis=axis)
    if cross_run is not None:
        for measure in C.CROSS_RUN_MEASURES:
            figures += [heatmaps.cross_run_overview(cross_run, measure),
                        heatmaps.cross_run_heatmaps(cross_run, measure)]
    parts = [fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
             for i, fig in enumerate(figures)]
    checkpoints = ", ".join(dict.fromkeys(table[C.CHECKPOINT])) if len(table) else "none"
    heading = title or f"dora-analysis report: {checkpoints}"
    warned = warning_lines(table)
    health = ("<h2>Health checks</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>"
                                                      for w in warned) + "</ul>") if warned else ""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(heading)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px} "
        "table.dataframe{border-collapse:collapse;font-size:12px} "
        "table.dataframe td,table.dataframe th{border:1px solid #ccc;padding:2px 6px}</style>"
        f"</head><body><h1>{html.escape(heading)}</h1>"
        "<p>ΔM and ΔD per the DoRA paper (Liu et al., ICML 2024), Eqs. 3–4; one point per weight "
        "matrix and training step. A dotted line, where it falls near the points, marks the ΔD "
        "that storage rounding alone produces. Beside each r: its 95 % bootstrap interval over "
        "layers, the mean r across layers at one step (within-step), across steps of one layer "
        "(within-layer), and r with each step's mean removed (partial).</p>"
        + health
        + "\n".join(parts)
        + "<h2>Per-matrix table</h2>"
        + table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
        + "</body></html>\n"
    )


def write_html(table: pd.DataFrame, correlations: pd.DataFrame, path: str | Path,
               *, title: str = "", cross_run: pd.DataFrame | None = None) -> Path:
    """Write :func:`html_report` atomically (with ``cross_run``: the cross-run heatmaps too).

    Example:
        >>> write_html(table, da.correlate(table), "report.html")  # doctest: +SKIP
    """
    path = check_output_path(path, suffixes=HTML_SUFFIXES)
    return atomic_write(path, _html_writer(table, correlations, title, cross_run))


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(
        value, spec)


def format_summary(table: pd.DataFrame, correlations: pd.DataFrame) -> str:
    """The CLI's stdout: per checkpoint × module kind, n, mean ΔM, mean ΔD, Pearson r with its
    bootstrap interval over layers, slope, and for a series the within-step r."""
    if correlations.empty:
        return "no weight matrices analysed\n"
    show_axis = correlations[C.AXIS].nunique() > 1
    # columns as wide as their longest value: long module names (position_embeddings) line up
    module_width = max(12, *(len(str(m)) + 2 for m in correlations[C.MODULE]))
    n_width = max(5, *(len(str(n)) for n in correlations[C.N]))
    lines = []
    for label, group in correlations.groupby(C.CHECKPOINT, sort=False):
        rows = table[table[C.CHECKPOINT] == label]
        steps = rows[C.STEP].dropna().unique()
        series = len(steps) > 1 and C.WITHIN_STEP_R in group
        head = f"{label}  (method: {group[C.METHOD].iloc[0]}"
        head += f", steps: {', '.join(str(int(s)) for s in sorted(steps))})" if len(steps) else ")"
        lines.append(head)
        lines.append(f"  {'module':<{module_width}}{'axis  ' if show_axis else ''}"
                     f"{'n':>{n_width}}  {'mean ΔM':>11}"
                     f"  {'mean ΔD':>11}  {'Pearson r':>9}  {'95% CI (layers)':>16}"
                     f"  {'slope':>11}" + (f"  {'within-step r':>13}" if series else ""))
        for _, r in group.iterrows():
            axis = f"{r[C.AXIS]:<6}" if show_axis else ""
            ci = (f"[{_fmt(r[C.R_CI_LOW], '+.2f')}, {_fmt(r[C.R_CI_HIGH], '+.2f')}]"
                  if C.R_CI_LOW in r and not math.isnan(r[C.R_CI_LOW]) else "-")
            lines.append(
                f"  {r[C.MODULE]:<{module_width}}{axis}{r[C.N]:>{n_width}}"
                f"  {_fmt(r[C.MEAN_DELTA_M], '11.4e')}"
                f"  {_fmt(r[C.MEAN_DELTA_D], '11.4e')}  {_fmt(r[C.PEARSON_R], '+9.3f'):>9}"
                f"  {ci:>16}  {_fmt(r[C.SLOPE], '+11.4e'):>11}"
                + (f"  {_fmt(r[C.WITHIN_STEP_R], '+13.3f'):>13}" if series else "")
            )
        lines.append("")
    warned = warning_lines(table)
    if warned:
        lines += ["health checks (the warnings column):", *(f"  {w}" for w in warned), ""]
    return "\n".join(lines)
