"""Following a training run while it is being written.

A run folder holds either a table that a training callback keeps rewriting
(``dora_analysis.parquet``, see ``DoraAnalysisCallback``) — re-read whenever its size or
modification time changes — or ``checkpoint-N/`` folders, each analysed against the base once
(the analyses are cached by file identity, so a refresh computes only the new checkpoints). A
checkpoint or table that cannot be read yet but was modified in the last
:data:`STILL_WRITING_S` seconds is taken to be still being written: it is retried at the next
refresh instead of being reported as an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

import _cache
import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.io.refs import series_steps

#: Tables a training callback writes into its run folder, in order of preference.
TABLE_NAMES = ("dora_analysis.parquet", "dora_analysis.csv", "dora_analysis.json")
STILL_WRITING_S = 120.0


@dataclass
class Snapshot:
    """What a run folder holds right now."""

    table: pd.DataFrame | None
    source: str
    waiting: list[str] = field(default_factory=list)
    """Checkpoints (or the table) not readable yet, still being written: retried later."""
    errors: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        if self.table is None or C.STEP not in self.table:
            return []
        return sorted(int(s) for s in self.table[C.STEP].dropna().unique())


def table_file(run: Path) -> Path | None:
    """The table a callback keeps in ``run`` (or ``run`` itself when it is a table file)."""
    if run.is_file():
        return run
    return next((run / n for n in TABLE_NAMES if (run / n).is_file()), None)


def fresh(path: Path, now: float | None = None) -> bool:
    """Whether anything in ``path`` was modified in the last :data:`STILL_WRITING_S` seconds."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    newest = max((_mtime(p) for p in files), default=_mtime(path))
    return (now or time.time()) - newest < STILL_WRITING_S


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile
        return 0.0


def follow(run: str, base: str, *, method: str = "auto", axis: str = "out",
           modules: tuple[str, ...] | None = None,
           previous: pd.DataFrame | None = None) -> Snapshot:
    """The run's table now: re-read, or the new checkpoints analysed and added."""
    path = Path(run)
    if not path.exists():
        return Snapshot(previous, run, errors=[f"{run}: no such file or folder"])
    table_path = table_file(path)
    if table_path is not None:
        try:
            return Snapshot(_cache.read_table_file(str(table_path)), str(table_path))
        except da.DoraAnalysisError as exc:
            if fresh(table_path):
                return Snapshot(previous, str(table_path),
                                waiting=[f"{table_path.name} is being written; retrying"])
            return Snapshot(previous, str(table_path), errors=[str(exc)])
    steps = series_steps(path)
    if not steps:
        return Snapshot(previous, run, waiting=[f"no checkpoint-N folder or {TABLE_NAMES[0]} in "
                                                f"{run} yet"])
    if not base:
        return Snapshot(previous, run, errors=["give the base checkpoint the run started from"])
    frames, snapshot = [], Snapshot(None, run)
    for _step, folder in steps:
        try:
            frames.append(_cache.analyze(base, str(folder), "", method, axis, modules))
        except da.DoraAnalysisError as exc:
            if fresh(folder):
                snapshot.waiting.append(f"{folder.name} is still being written; retrying")
            else:
                snapshot.errors.append(str(exc))
    snapshot.table = pd.concat(frames, ignore_index=True) if frames else previous
    return snapshot


def trend(table: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean ``value`` per step (rows) and module kind (columns), for a line chart."""
    rows = table.dropna(subset=[C.STEP])
    return rows.pivot_table(index=C.STEP, columns=C.MODULE, values=value, aggfunc="mean")
