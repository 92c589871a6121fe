"""ΔM/ΔD while a Hugging Face ``Trainer`` (or TRL's ``SFTTrainer`` …) trains: a callback.

On every save, :class:`DoraAnalysisCallback` analyses the checkpoint the Trainer has just written
(``on_save`` runs after ``OUTPUT/checkpoint-N`` is complete): full weights or a PEFT adapter
folder, against the pre-trained base. It appends the rows, with their ``step``, to a Parquet
table in the run folder (rewritten atomically; the dashboard and :func:`dora_analysis.read_table`
read it while the run goes on), and logs per module kind the mean ``delta_m`` and ``delta_d`` of
that checkpoint and the Pearson r of all rows so far as ``dora/<module>/delta_m``,
``dora/<module>/delta_d`` and ``dora/<module>/pearson_r`` through the Trainer's own ``log`` —
so TensorBoard, W&B, trackio, MLflow … show them next to the loss.

Callbacks are not handed the Trainer; its ``log`` is reached through the Trainer that calls the
event (or give ``trainer=``). The base Trainer's ``log`` is called, not a subclass's: TRL's
``log`` would fold its pending training metrics into our entry.

Only the main process works; the callback reads files and never touches the model, the
optimizer or the data, so training is the same with and without it (tested). A base that does
not fit the model is an error when training starts; a checkpoint that cannot be analysed is an
:class:`~dora_analysis.errors.AnalysisCallbackWarning` and training goes on.

**One table, one run.** Every row carries the run it belongs to (column ``run``), and the run id
is saved in each checkpoint's ``trainer_state.json`` (the callback is an ``ExportableState``).
When training starts, a table already in ``output_dir`` is kept only if the run resumes from a
checkpoint of that same run — then its rows after the resumed step are dropped (they belong to the
history being replaced). Otherwise (a new run, or a resume from another run's checkpoint) the old
table is moved aside to ``dora_analysis.<its run>.parquet``, named in a warning, and this run
starts a new table: two runs' rows are never pooled into one Pearson r.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import secrets
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import transformers
from transformers.trainer_callback import ExportableState

from .. import columns as C
from ..config import AnalysisConfig
from ..errors import AnalysisCallbackWarning, ConfigError, DoraAnalysisError

PEFT_BASE_ATTRIBUTE = "base_model_name_or_path"
log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A run id that sorts by start time: ``20261201-142233-3f9a1c``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def plain(name: str, value):
    """``value`` as JSON (the Trainer saves the callback's settings in its checkpoints)."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, numbers.Integral):  # numpy's too: JSON takes Python's only
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(name, v) for v in value]
    raise ConfigError(f"DoraAnalysisCallback: {name}={value!r} is not a plain value (text, "
                      "number, bool or a list of them); the Trainer saves these settings in its "
                      "checkpoints")


def set_aside(path: Path, runs: list[str]) -> Path:
    """Move an earlier run's table out of the way, beside it, under a name that says whose."""
    tag = runs[0] if len(runs) == 1 else time.strftime(
        "before-%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    aside = path.with_name(f"{path.stem}.{tag}{path.suffix}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.stem}.{tag}-{n}{path.suffix}")
    path.rename(aside)
    return aside


def default_base(model) -> str | None:
    """The pre-trained source a model names: PEFT's ``base_model_name_or_path``, else the
    ``transformers`` config's ``_name_or_path``."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        for config in peft_config.values():
            name = getattr(config, PEFT_BASE_ATTRIBUTE, None)
            if name:
                return name
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


def calling_trainer(limit: int = 12) -> transformers.Trainer | None:
    """The ``Trainer`` whose method triggered the current callback event, from the call stack."""
    frame = inspect.currentframe()
    try:
        for _ in range(limit):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, transformers.Trainer):
                return candidate
        return None
    finally:
        del frame


def module_summary(rows, history) -> dict[str, float]:
    """``dora/<module>/delta_m|delta_d`` (means over this checkpoint's rows) and
    ``dora/<module>/pearson_r`` (over every row so far), per module kind."""
    from ..stats import correlation, usable_points

    logs: dict[str, float] = {}
    rows, history = usable_points(rows), usable_points(history)
    for module, part in rows.groupby(C.MODULE, sort=True):
        logs[f"dora/{module}/delta_m"] = float(part[C.DELTA_M].mean())
        logs[f"dora/{module}/delta_d"] = float(part[C.DELTA_D].mean())
        seen = history[history[C.MODULE] == module]
        r = correlation(seen[C.DELTA_D].to_numpy(), seen[C.DELTA_M].to_numpy())[C.PEARSON_R]
        if not math.isnan(r):
            logs[f"dora/{module}/pearson_r"] = r
    return logs


class DoraAnalysisCallback(transformers.TrainerCallback, ExportableState):
    """Analyse each checkpoint as it is saved; log ΔM, ΔD and their correlation.

    Args:
        base: the pre-trained weights (path or Hub id); default: the model's own source
            (PEFT's ``base_model_name_or_path``, else ``model.config._name_or_path``).
        modules: module kinds or names to keep (``("q", "v")`` or ``"q,v"``); default all.
        axis: ``out`` (per output channel, as the paper), ``in`` or ``both``.
        output: the table's file name inside ``output_dir`` (``.parquet``, ``.csv``, ``.json``).
        log: log the per-module summary through the Trainer.
        trainer: the Trainer, if it cannot be found from the calling event.
        settings: other :class:`~dora_analysis.AnalysisConfig` fields (``include=…``), plain
            values (they are saved in the checkpoints' ``trainer_state.json``; ``token`` is not).

    Example:
        >>> trainer = SFTTrainer(model=..., args=..., train_dataset=...,  # doctest: +SKIP
        ...                      callbacks=[DoraAnalysisCallback(modules=("q", "v"))])
    """

    def __init__(self, base: str | Path | None = None, modules: Sequence[str] | None = None,
                 axis: str = "out", output: str = "dora_analysis.parquet", log: bool = True, *,
                 trainer: transformers.Trainer | None = None, **settings) -> None:
        from ..report import TABLE_WRITERS

        self.config = AnalysisConfig.from_settings(
            axis=axis, modules=modules, **settings)  # a str is a comma-separated list
        if Path(output).suffix.lower() not in TABLE_WRITERS or Path(output).name != output:
            raise ConfigError(f"output must be a file name ending in "
                              f"{', '.join(TABLE_WRITERS)}, got {output!r}")
        self.base = None if base is None else str(base)
        self.output, self.log, self.trainer = output, log, trainer
        self.table = None  # every row of this run so far
        self.run_id: str | None = None
        given = {"base": self.base, "modules": modules, "axis": axis, "output": output,
                 "log": log, **{k: v for k, v in settings.items() if k != "token"}}
        self.arguments = {k: plain(k, v) for k, v in given.items()}

    def state(self) -> dict:
        """What the Trainer saves in each checkpoint's ``trainer_state.json`` (and, with
        ``restore_callback_states_from_checkpoint``, rebuilds the callback from): the settings
        and the run this callback's table belongs to."""
        return {"args": self.arguments, "attributes": {"run_id": self.run_id}}

    # -- events ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Resolve the base and check that it fits the model, before the first step; then
        decide which table this run writes (see the module notes)."""
        # A checkpoint saved without this callback has no entry for it, and the Trainer's
        # save would fail on the missing key.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if not state.is_world_process_zero:
            return
        if self.base is None:
            self.base = default_base(model)
            if self.base is None:
                raise ConfigError("DoraAnalysisCallback: the model does not name its pre-trained "
                                  "source; pass base= (a path or Hub id)")
        from ..live import check_model

        try:
            check_model(model, self.base, self.config, label=type(model).__name__)
        except (DoraAnalysisError, OSError) as exc:
            raise ConfigError(f"DoraAnalysisCallback: base {self.base} does not fit the model "
                              f"being trained: {str(exc).splitlines()[0]}") from None
        if self.trainer is None:
            self.trainer = calling_trainer()
        try:
            self.start_table(Path(args.output_dir) / self.output, state)
        except Exception as exc:  # the earlier table cannot be read or moved: a new one
            self.run_id, self.table = self.run_id or new_run_id(), None
            warnings.warn(AnalysisCallbackWarning(
                f"{Path(args.output_dir) / self.output}: the earlier table could not be kept "
                f"({type(exc).__name__}: {exc}); this run writes a new one"), stacklevel=2)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.base is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # An observer: whatever fails, the training run goes on (a warning says what).
        try:
            rows = self.record(folder, Path(args.output_dir) / self.output, state)
        except Exception as exc:
            gone = "" if folder.exists() else " (the checkpoint is gone: rotated away?)"
            self.warn(f"{folder}: not analysed{gone}", exc)
            return
        try:
            self.log_summary(rows)
        except Exception as exc:
            self.warn(f"{folder}: rows written, ΔM/ΔD not logged", exc)

    @staticmethod
    def warn(what: str, exc: Exception) -> None:
        first = str(exc).splitlines()[0] if str(exc) else ""
        warnings.warn(AnalysisCallbackWarning(
            f"{what} ({type(exc).__name__}: {first}); training goes on"), stacklevel=3)

    def record(self, folder: Path, table: Path, state):
        """Analyse the checkpoint just saved and add its rows to the table; the rows."""
        rows = self.analyse(folder)
        if self.run_id is None:  # on_train_begin did not run (a hand-driven callback)
            self.start_table(table, state)
        self.append(rows, table, state.global_step)
        return rows

    def log_summary(self, rows) -> None:
        """Log one checkpoint's per-module means and the r so far through the Trainer."""
        if not self.log:
            return
        trainer = self.trainer if self.trainer is not None else calling_trainer()
        if trainer is None:
            warnings.warn(AnalysisCallbackWarning(
                "the Trainer was not found, so ΔM/ΔD are not logged (rows are written); "
                "pass DoraAnalysisCallback(trainer=trainer)"), stacklevel=3)
            return
        logs = module_summary(rows, self.table)
        if logs:
            transformers.Trainer.log(trainer, logs)

    # -- work -----------------------------------------------------------------------------------
    def analyse(self, folder: Path):
        """The table of one saved checkpoint (what ``dora-analyze BASE folder`` prints)."""
        from ..analysis import analyze

        return analyze(self.base, folder, config=self.config)

    def resumed_run(self, state) -> str | None:
        """The run a resumed Trainer continues, as its checkpoint's ``trainer_state.json``
        recorded it (None for a new run, or a checkpoint saved without this callback)."""
        if not state.global_step:
            return None
        entries = (state.stateful_callbacks or {}).get(type(self).__name__)
        entries = entries if isinstance(entries, list) else [entries]
        for entry in entries:
            if isinstance(entry, dict) and entry.get("args", {}).get("output") == self.output:
                return entry.get("attributes", {}).get("run_id")
        return None

    def start_table(self, path: Path, state) -> None:
        """This run's table: the rows of the run being resumed up to its step, or a new one
        (an earlier run's table moved aside, with a warning)."""
        from ..errors import TableFormatError
        from ..report import write_table
        from ..tables import read_table

        resumed = self.resumed_run(state)
        self.run_id = resumed or new_run_id()
        self.table = None
        if not path.is_file():
            return
        try:
            old = read_table(path)
        except TableFormatError:
            old = None
        runs = [] if old is None or C.RUN not in old else list(dict.fromkeys(old[C.RUN]))
        if resumed is not None and runs == [resumed]:
            self.table = old[old[C.STEP].isna() | (old[C.STEP] <= state.global_step)]
            if len(self.table) < len(old):
                dropped = sorted(set(old[C.STEP].dropna()) - set(self.table[C.STEP].dropna()))
                log.info("%s: rows of steps %s dropped (after the resumed step %d)", path,
                         ", ".join(map(str, dropped)), state.global_step)
                write_table(self.table, path)
            return
        aside = set_aside(path, runs)
        why = (f"not of the run resumed from step {state.global_step}" if state.global_step
               else "training started anew")
        warnings.warn(AnalysisCallbackWarning(
            f"{path} held another run's rows ({why}): moved to {aside.name}; this run starts a "
            "new table"), stacklevel=3)

    def append(self, rows, path: Path, step: int) -> None:
        """Add one checkpoint's rows, marked with this run, to the run's table (rows of the same
        step are replaced), rewriting the file atomically."""
        import pandas as pd

        from ..report import write_table

        rows = rows.assign(**{C.RUN: self.run_id})
        kept = self.table[self.table[C.STEP] != step] if self.table is not None else rows[:0]
        self.table = pd.concat([kept, rows], ignore_index=True) if len(kept) else rows
        write_table(self.table, path)
