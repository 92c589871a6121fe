"""``compare_runs(base, runs)``: how similar several runs' updates of the same base are, per matrix.

One row per pair of runs and weight matrix, with the measures of
:mod:`dora_analysis.metrics.similarity` (update cosine, subspace similarity, TIES sign conflict,
Jaccard index of the changed elements). The runs are planned against the base like
:func:`dora_analysis.analyze`'s tuned checkpoints, so every shape mismatch of every run is
reported at once; a series (``checkpoint-N/`` folders) is compared at its last step.

Per matrix, each run's update is read once — a LoRA adapter's as its factors (cosine and
subspaces in closed form), anything else as the dense ΔW in float64 — then every pair of runs is
scored. An adapter's dense ΔW (for the sign conflict) and its merged weight rounded to the base's
dtype (for the changed-element mask) are materialised whole, one matrix at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import columns as C
from .config import AnalysisConfig
from .errors import ConfigError, TensorMismatchError, listing
from .io.guard import shown
from .io.keys import layer_index, module_kind
from .io.open import open_checkpoint
from .jobs import Job, Ref
from .metrics.base import fraction, positive_int
from .metrics.similarity import (
    DEFAULT_K,
    DEFAULT_TRIM,
    Factors,
    Update,
    conflict_share,
    dense,
    inner,
    left_basis,
    mask_jaccard,
    similarity_of_bases,
    trim_mask,
)
from .metrics.sparsity import stored_pair, unchanged_mask
from .pairs import MatrixPair, PairView, open_tuned
from .plan import plan

if TYPE_CHECKING:
    from .io.base import TensorSource

log = logging.getLogger("dora_analysis")


@dataclass
class RunUpdate:
    """One run's update of one matrix, and what every pairwise measure needs of it."""

    update: Update
    delta: np.ndarray
    """ΔW dense, float64 (an adapter's s·B·A multiplied out)."""
    changed: np.ndarray
    """Elements whose stored value changed (an adapter: the merged weight in the base dtype)."""
    norm_sq: float
    basis: np.ndarray
    rank: int
    kept: np.ndarray
    """TIES' trim mask of ΔW."""


def run_update(view: PairView, k: int, trim: float) -> RunUpdate:
    """Read one run's update of one matrix and prepare it for :func:`pair_row`."""
    lora = view.low_rank()
    if lora is not None:  # ΔW = s·B·A exactly: cosine and subspaces from the factors
        a, b = lora.factors()
        update: Update = Factors.of(b, a, lora.scale)  # B·A is (out, in), like view.delta()
    else:
        update = view.delta().numpy()
    w0, wt = stored_pair(view)
    basis, rank = left_basis(update, k)
    delta = dense(update)
    return RunUpdate(update, delta, ~unchanged_mask(w0, wt), inner(update, update), basis, rank,
                     trim_mask(delta, trim))


def pair_row(x: RunUpdate, y: RunUpdate, k: int) -> dict[str, float | int]:
    """The four measures of one pair of runs on one matrix (and the k the subspaces used)."""
    norms = x.norm_sq * y.norm_sq
    cosine = (max(-1.0, min(1.0, inner(x.update, y.update) / math.sqrt(norms)))
              if norms > 0 and math.isfinite(norms) else math.nan)
    similarity, used = similarity_of_bases(x.basis, x.rank, y.basis, y.rank, k)
    return {C.UPDATE_COSINE: cosine, C.SUBSPACE_SIMILARITY: similarity,
            C.SIGN_CONFLICT: conflict_share(x.delta, y.delta, x.kept, y.kept),
            C.MASK_JACCARD: mask_jaccard(x.changed, y.changed), C.SUBSPACE_K: used}


def last_steps(jobs: Sequence[Job]) -> list[Job]:
    """One job per run label: a series' last step (with a note), else the run itself."""
    by_label: dict[str, list[Job]] = {}
    for job in jobs:
        by_label.setdefault(job.checkpoint.label, []).append(job)
    chosen = []
    for label, group in by_label.items():
        last = max(group, key=lambda j: -1 if j.checkpoint.step is None else j.checkpoint.step)
        if len(group) > 1:
            log.info("run %s is a series of %d checkpoints: its last step (%s) is compared",
                     shown(label), len(group), last.checkpoint.step)
        chosen.append(last)
    return chosen


def common_pairs(jobs: Sequence[Job]) -> list[MatrixPair]:
    """The matrices every run changes, in the first run's order; the others with a note."""
    keys = [{(p.name, p.expert): p for p in job.pairs} for job in jobs]
    shared = [key for key in keys[0] if all(key in other for other in keys[1:])]
    left_out = sorted({f"{n}" + (f"[{e}]" if e is not None else "")
                       for ks in keys for (n, e) in ks if (n, e) not in set(shared)})
    if not shared:
        raise TensorMismatchError(
            "the runs change no weight matrix in common (an adapter holds only its target "
            f"modules): {listing(left_out)}; compare runs of the same modules", left_out)
    if left_out:
        log.info("%d matrices are not in every run and are left out of the cross-run table: %s",
                 len(left_out), listing(left_out))
    return [keys[0][key] for key in shared]


def check_settings(runs: Sequence[Ref], k: Any, trim: Any) -> tuple[int, float]:
    """Refuse, before any file is read, what compare_runs cannot do."""
    if len(runs) < 2:
        raise ConfigError(f"--cross-run compares two runs or more; got {len(runs)} (give two "
                          "TUNED checkpoints or more)")
    try:
        k = positive_int(k)
    except ValueError as exc:
        raise ConfigError(f"--cross-run-k {exc}, got {k!r}") from None
    try:
        trim = fraction(trim)
    except ValueError as exc:
        raise ConfigError(f"--cross-run-trim {exc}, got {trim!r}") from None
    return k, trim


def compare_runs(base: Ref, runs: Sequence[Ref], labels: Sequence[str] | None = None,
                 modules: Sequence[str] | str | None = None, k: int = DEFAULT_K,
                 trim: float = DEFAULT_TRIM, *, config: AnalysisConfig | None = None
                 ) -> pd.DataFrame:
    """Similarity of several runs' updates of one base: one row per pair of runs × matrix.

    Args:
        base: the checkpoint every run was fine-tuned from.
        runs: two references or more (files, folders, adapters; a series: its last step).
        labels: one per run (default: derived from the reference); they must differ.
        modules: module kinds or names to keep (as ``analyze``'s ``modules``).
        k: subspaces of the top-k left singular vectors of ΔW (clamped to the ranks, noted).
        trim: TIES' kept share for the sign conflict (the top ``trim`` of |ΔW| per matrix).
        config: read settings (``io``, ``token``, ``lora_alpha``, ``progress`` …) as for
            ``analyze``; its ``modules`` is used when ``modules`` is None.

    Returns:
        A DataFrame with :data:`dora_analysis.columns.CROSS_RUN_COLUMNS`: ``run_a``, ``run_b``,
        ``name``, ``layer``, ``module``, ``update_cosine``, ``subspace_similarity``,
        ``sign_conflict``, ``mask_jaccard``, ``expert``, ``subspace_k`` (the k used), ``base``.

    Example:
        >>> cross = compare_runs("base/", ["runs/seed0", "runs/seed1"])  # doctest: +SKIP
        >>> cross.groupby("module")["update_cosine"].mean()  # doctest: +SKIP
    """
    runs = [runs] if isinstance(runs, str) else list(runs)
    k, trim = check_settings(runs, k, trim)
    config = config or AnalysisConfig()
    if modules is not None:
        config = dataclasses.replace(config, modules=modules)
    work = plan(base, runs, labels=labels, config=config)  # labels: one per run, distinct
    jobs = last_steps(work.jobs)
    pairs = common_pairs(jobs)
    rows = []
    options = config.read_options
    with contextlib.ExitStack() as stack:
        base_src: TensorSource = stack.enter_context(open_checkpoint(work.base, options))
        sources = [stack.enter_context(open_tuned(job.checkpoint.path, options, base_src))
                   for job in jobs]
        for pair in tqdm(pairs, disable=not config.progress, desc="comparing runs",
                         leave=False):
            updates = []
            for job, src in zip(jobs, sources, strict=True):
                run_pair = {(p.name, p.expert): p for p in job.pairs}[(pair.name, pair.expert)]
                view = PairView(run_pair, base_src, src, config.resolved_settings, {})
                updates.append(run_update(view, k, trim))
            for i in range(len(jobs)):
                for j in range(i + 1, len(jobs)):
                    rows.append({
                        C.RUN_A: shown(jobs[i].checkpoint.label),
                        C.RUN_B: shown(jobs[j].checkpoint.label),
                        C.NAME: pair.name, C.LAYER: layer_index(pair.name),
                        C.MODULE: module_kind(pair.name), C.EXPERT: pair.expert,
                        C.BASE: shown(jobs[i].base),
                        **pair_row(updates[i], updates[j], k)})
    frame = cross_run_frame(rows)
    note_clamped(frame, k)
    return frame


def note_clamped(frame: pd.DataFrame, k: int) -> None:
    """One note when k exceeded the rank of some updates (the ``subspace_k`` column has it)."""
    clamped = frame[(frame[C.SUBSPACE_K] < k) & frame[C.SUBSPACE_K].gt(0)]
    if len(clamped):
        used = ", ".join(map(str, sorted(set(clamped[C.SUBSPACE_K]))))
        log.info("--cross-run-k %d is more than the rank of ΔW on %d of %d rows (k used: %s; "
                 "column subspace_k): subspace_similarity is over the top min(k, ranks) vectors",
                 k, len(clamped), len(frame), used)


def cross_run_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows → the cross-run table, columns in contract order and typed."""
    frame = pd.DataFrame.from_records(rows, columns=list(C.CROSS_RUN_COLUMNS))
    return frame.astype(C.CROSS_RUN_DTYPES)
