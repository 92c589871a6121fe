"""Following a training run while it is being written.

A run folder holds either a table that a training callback keeps rewriting
(``dora_analysis.parquet``, see ``DoraAnalysisCallback``) — re-read whenever its size or
modification time changes — or ``checkpoint-N/`` folders, each analysed against the base once
(the analyses are cached by file identity, so a refresh computes only the new checkpoints).

* **Rotated checkpoints.** A trainer with ``save_total_limit`` deletes old checkpoints; their rows,
  computed at an earlier refresh, are kept (:class:`RunRows`, one per run and settings, in the
  session) and named in a note. One deleted while it is read is gone, not an error: named in a
  note, without rows. When a checkpoint is rewritten (a resumed or restarted run), the
  kept rows of later steps that no longer exist belonged to the abandoned history: dropped.
* **Being written or wrong?** A checkpoint that cannot be read is retried at the next refresh,
  not reported, only while it may be a save in progress: it was modified in the last
  :data:`STILL_WRITING_S` seconds, it lacks the ``trainer_state.json`` a Hugging Face Trainer
  writes last, and the error is one a half-written file gives (or the run is a Trainer's, whose
  other checkpoints show that file). Anything else — shapes that differ from the base, no matrix
  in common, a complete checkpoint that fails — is an error at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.app import cache
from dora_analysis.app.access import Readable, require
from dora_analysis.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
)
from dora_analysis.io.refs import series_steps

#: Tables a training callback writes into its run folder, in order of preference.
TABLE_NAMES = ("dora_analysis.parquet", "dora_analysis.csv", "dora_analysis.json")
STILL_WRITING_S = 120.0
#: What a Hugging Face Trainer writes last into ``checkpoint-N/``: once there, the save is over.
TRAINER_DONE = "trainer_state.json"
#: Errors a checkpoint caught half-written gives (a truncated file, a shard not there yet).
PARTIAL_WRITE_ERRORS = (CheckpointNotFoundError, CheckpointFormatError)


@dataclass
class Seen:
    """One checkpoint's rows and the identity of the files they were computed from."""

    identity: tuple
    rows: pd.DataFrame


@dataclass
class RunRows:
    """What has been read of one followed run with one set of settings (kept in the session)."""

    key: tuple
    steps: dict[int, Seen] = field(default_factory=dict)
    table: pd.DataFrame | None = None
    """The callback's table as last read whole (kept while a rewrite is caught midway)."""

    def frame(self) -> pd.DataFrame | None:
        frames = [self.steps[s].rows for s in sorted(self.steps)]
        return pd.concat(frames, ignore_index=True) if frames else None


@dataclass
class Snapshot:
    """What a run folder holds right now."""

    table: pd.DataFrame | None
    source: str
    waiting: list[str] = field(default_factory=list)
    """Checkpoints (or the table) not readable yet, still being written: retried later."""
    errors: list[str] = field(default_factory=list)
    rotated: list[int] = field(default_factory=list)
    """Steps whose checkpoint is gone (rotated away by the trainer); their rows are kept."""
    vanished: list[int] = field(default_factory=list)
    """Steps whose checkpoint went while it was read, before it had rows: gone, not an error."""

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


def being_written(folder: Path, error: Exception, *, trainer_run: bool,
                  now: float | None = None) -> bool:
    """Whether ``error`` reading ``folder`` may be a save in progress (see the module notes)."""
    if (folder / TRAINER_DONE).is_file() or not fresh(folder, now):
        return False  # the save is over, or long abandoned: the error is real
    if trainer_run:  # the Trainer's other checkpoints show the file this one lacks yet
        return True
    return isinstance(error, PARTIAL_WRITE_ERRORS) and not isinstance(error, UnsafeCheckpointError)


def follow(run: Readable, base: Readable | None, *, method: str = "auto", axis: str = "out",
           modules: tuple[str, ...] | None = None, memory: RunRows | None = None) -> Snapshot:
    """The run's table now: re-read, or the new checkpoints analysed and added to ``memory``
    (the rows of earlier refreshes)."""
    memory = memory if memory is not None else RunRows(())
    path = Path(require(run).ref)
    if not path.exists():
        return Snapshot(memory.table, run.ref, errors=[f"{run.ref}: no such file or folder"])
    table_path = table_file(path)
    if table_path is not None:
        return _follow_table(table_path, memory)
    steps = series_steps(path)
    if not steps and not memory.steps:
        return Snapshot(None, run.ref, waiting=[f"no checkpoint-N folder or {TABLE_NAMES[0]} in "
                                                f"{run.ref} yet"])
    if base is None:
        return Snapshot(None, run.ref, errors=["give the base checkpoint the run started from"])
    snapshot = Snapshot(None, run.ref)
    present = dict(steps)
    trainer_run = any((folder / TRAINER_DONE).is_file() for folder in present.values())
    for step, folder in steps:
        source = Readable(str(folder))  # inside the run folder just checked, links included
        identity = cache.identity(source)
        seen = memory.steps.get(step)
        if seen is not None and seen.identity == identity:
            continue
        try:
            rows = cache.analyze(require(base), source, "", method, axis, modules)
        except da.DoraAnalysisError as exc:
            if not folder.exists():  # rotated away while it was read
                snapshot.vanished.append(step)
            elif being_written(folder, exc, trainer_run=trainer_run):
                snapshot.waiting.append(f"{folder.name} is still being written; retrying")
            else:
                snapshot.errors.append(str(exc))
            continue
        if seen is not None:  # rewritten: what was rotated away after it is another history
            for old in [s for s in memory.steps if s > step and s not in present]:
                del memory.steps[old]
        memory.steps[step] = Seen(identity, rows)
    snapshot.rotated = sorted(s for s in memory.steps if s not in present)
    snapshot.table = memory.frame()
    return snapshot


def _follow_table(path: Path, memory: RunRows) -> Snapshot:
    try:  # the callback's own table: its path is inside the run folder just checked
        memory.table = cache.read_table_file(Readable(str(path)))
        return Snapshot(memory.table, str(path))
    except da.DoraAnalysisError as exc:
        if fresh(path):
            return Snapshot(memory.table, str(path),
                            waiting=[f"{path.name} is being written; retrying"])
        return Snapshot(memory.table, str(path), errors=[str(exc)])


def rotated_note(steps: list[int]) -> str | None:
    """A line for the page about checkpoints the trainer deleted, or None."""
    if not steps:
        return None
    names = ", ".join(f"checkpoint-{s}" for s in steps)
    return (f"{names}: no longer in the run folder (rotated away by the trainer's "
            "save_total_limit?); "
            + ("its rows are" if len(steps) == 1 else "their rows are")
            + " kept from an earlier read.")


def vanished_note(steps: list[int]) -> str | None:
    """A line for the page about checkpoints deleted while they were read, or None."""
    if not steps:
        return None
    names = ", ".join(f"checkpoint-{s}" for s in steps)
    return (f"{names}: deleted while being read (rotated away by the trainer's "
            "save_total_limit?); no rows for " + ("it." if len(steps) == 1 else "them."))
