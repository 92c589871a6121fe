"""``analyze(base, tuned…)``: the tidy ΔM/ΔD table, streamed one row block at a time.

Work happens in two stages. :func:`~dora_analysis.plan.plan` checks everything and lists the
work, one :class:`~dora_analysis.jobs.Job` per tuned checkpoint; :func:`run` then has an executor
compute it: each matrix pair of a job is read in row blocks of bounded size, the per-vector sums
accumulate in float64 and one row per axis is filled from the metric registry
(:mod:`dora_analysis.rows`, :mod:`dora_analysis.metrics`). Jobs are plain data: an executor may
run them in this process (the default), in threads, or on other machines, each of which opens
the checkpoints itself.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import plan as planning
from .cache.results import pair_results
from .config import AnalysisConfig
from .errors import ConfigError
from .executors import hint, run_local, torch_threads
from .io.base import TensorSource
from .jobs import Job, Plan, Ref
from .pairs import Workspace
from .rows import compute_pair, row, to_frame, warn_nonfinite
from .vanished import READ_ERRORS, without_vanished

if TYPE_CHECKING:
    import pandas as pd


def run_job(job: Job, base: TensorSource, tuned: TensorSource, config: AnalysisConfig, *,
            workspace: Workspace | None = None, progress: Callable[[int], object] | None = None
            ) -> list[dict]:
    """The table rows of one job, in pair then axis order, from already opened sources.

    ``progress(n)`` is called with the number of elements of each pair when it is done. Torch
    runs one thread meanwhile, as every executor does: the same bits as :func:`analyze`.
    """
    hint(job, base, tuned)  # remote readers fetch only these tensors, neighbours coalesced
    records = []
    with torch_threads(1, config):
        for pair in job.pairs:
            for axis, values in compute_pair(base, tuned, pair, config, workspace).items():
                warn_nonfinite(job.checkpoint, pair, axis, values)
                records.append(row(job, pair, axis, values))
            if progress is not None:
                progress(pair.numel)
    return records


def run(work: Plan, client: Any = None, cache: Any = None, *,
        meanwhile: Callable[[], object] | None = None) -> list[dict]:
    """Compute a plan: on a Dask cluster when ``client`` is given, else in this process on
    ``config.workers`` threads (default: every usable core). The rows are the same, bit for bit,
    in the same order, whichever runs them (see :mod:`dora_analysis.executors`).

    ``cache`` (see :func:`analyze`): pairs computed by an earlier run are read from it and each
    pair computed is stored as soon as it is done. A tuned checkpoint deleted meanwhile stops
    the run, or is left out (``skip_vanished``; see :mod:`dora_analysis.vanished`).

    ``meanwhile()`` runs in this thread while the workers compute (imports the caller needs
    next; see :func:`~dora_analysis.executors.run_local`).
    """
    from tqdm.auto import tqdm

    config = work.config
    with tqdm(total=work.numel, unit="el", unit_scale=True, disable=not config.progress,
              file=sys.stderr, desc="analysing", leave=False) as bar, \
            pair_results(work, cache) as results:
        while True:
            known = results.known(work)
            bar.reset(total=work.numel)
            bar.update(sum(work.jobs[j].pairs[p].numel for j, p in known))
            hooks = {"progress": bar.update, "known": known, "on_pair": results.recorder(work)}
            try:
                if client is not None:
                    from .integrations.dask import run_dask

                    if meanwhile is not None:
                        meanwhile()
                    records = run_dask(work, client, **hooks)
                else:
                    records = run_local(work, config.workers, meanwhile=meanwhile, **hooks)
            except READ_ERRORS as exc:
                work = without_vanished(work, exc)  # re-raises unless a checkpoint vanished
                continue
            results.report(sum(len(job.pairs) for job in work.jobs))
            return records


def import_modules(*names: str) -> Callable[[], None]:
    """A ``meanwhile`` for :func:`run`: import these modules (the table needs pandas)."""
    def load() -> None:
        for name in names:
            importlib.import_module(name)

    return load


def analyze(
    base: Ref,
    tuned: Ref | Sequence[Ref],
    *,
    labels: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    config: AnalysisConfig | None = None,
    client: Any = None,
    cache: bool | str | Path | None = None,
    **settings,
) -> pd.DataFrame:
    """Compare tuned checkpoints with their base: one row per (checkpoint, matrix, axis).

    Args:
        base: reference to the pre-trained weights (file or folder).
        tuned: one reference or several (files, folders, ``checkpoint-N`` series).
        labels: one label per tuned reference (default: derived from the reference).
        methods: ``ft``/``lora``/``dora``/``unknown``/``auto``, once or once per reference.
        config: an :class:`AnalysisConfig`; or pass its fields as keywords
            (``axis="in"``, ``modules=("q", "v")``, ``include=r"layers\\.1"``, ``progress=True``),
            metric switches and settings alike (see :mod:`dora_analysis.metrics`);
            ``workers=N`` threads (default: every usable core).
        client: a ``dask.distributed.Client``: run on its cluster instead (the workers open the
            checkpoints themselves, by the same paths); the table is the same, bit for bit.
        cache: the results cache (:mod:`dora_analysis.cache.results`): ``True`` for the
            default folder (``$XDG_CACHE_HOME/dora-analysis``, as ``dora-analyze``), a folder,
            or None (the default: nothing written). A run stopped midway and started again
            computes only what it had not; the table is the same, bit for bit.

    Returns:
        A DataFrame with the columns of :data:`dora_analysis.columns.TABLE_COLUMNS` followed by
        those of the enabled metrics.

    Example:
        >>> table = analyze("pre.safetensors", "run/", modules=("q", "v"))  # doctest: +SKIP
        >>> table[["layer", "module", "delta_m", "delta_d"]]  # doctest: +SKIP
    """
    if config is None:
        config = AnalysisConfig.from_settings(**settings)
    elif settings:
        raise ConfigError("pass either config= or keyword settings, not both")
    work = planning.plan(base, tuned, labels=labels, methods=methods, config=config)
    return to_frame(run(work, client, cache, meanwhile=import_modules("pandas")), config)
