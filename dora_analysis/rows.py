"""Rows of the table: one matrix pair's sums (:func:`pair_sums`), its metrics from the registry
(:func:`metric_values`, see :mod:`dora_analysis.metrics`) and the row that names it
(:func:`row`); :func:`to_frame` turns the rows into the typed table.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from . import columns as C
from . import metrics as registry
from .config import AnalysisConfig
from .decompose import VectorSums
from .errors import NonFiniteWeightWarning
from .io.base import TensorSource
from .io.guard import shown
from .io.keys import expert_index, layer_index, module_kind
from .jobs import Job, TunedCheckpoint
from .pairs import MatrixPair, PairView, Workspace, stream_sums

if TYPE_CHECKING:
    import pandas as pd


def pair_sums(base: TensorSource, tuned: TensorSource, pair: MatrixPair, config: AnalysisConfig,
              workspace: Workspace | None = None) -> dict:
    """The per-vector sums of one pair along every requested axis.

    Adapters give axis ``out`` in closed form (no ``B @ A``, see :mod:`dora_analysis.lowrank`);
    everything else streams the pair once, in row blocks, for all remaining axes.
    """
    sums, axes = {}, config.axes
    if config.closed_form and "out" in axes and pair.expert is None:
        closed = tuned.closed_form(pair.tuned_name, config.block_elements)
        if closed is not None:
            sums["out"] = VectorSums(*closed)
            axes = tuple(a for a in axes if a != "out")
    if axes:
        sums |= stream_sums(base, tuned, pair, axes, config.block_elements, workspace)
    return sums


def compute_pair(base: TensorSource, tuned: TensorSource, pair: MatrixPair,
                 config: AnalysisConfig, workspace: Workspace | None = None
                 ) -> dict[str, dict[str, object]]:
    """Every enabled metric of one matrix pair: axis → column → value."""
    return metric_values(
        PairView(pair, base, tuned, config.resolved_settings,
                 pair_sums(base, tuned, pair, config, workspace)), config)


def metric_values(view: PairView, config: AnalysisConfig) -> dict[str, dict[str, object]]:
    """Every metric ``config`` enables, of one pair's view: axis → column → value."""
    metrics = registry.enabled(config.metrics)
    per_matrix: dict[str, object] = {}
    for metric in metrics:
        if not metric.per_axis:
            per_matrix |= metric.compute(view)
    values = {}
    for axis in config.axes:
        at = view.at(axis)
        row: dict[str, object] = {}
        for metric in metrics:
            row |= metric.compute(at) if metric.per_axis else {}
        values[axis] = row | per_matrix
    return values


def row(job: Job, pair: MatrixPair, axis: str, values: dict[str, object]) -> dict:
    """The table row of one pair along one axis: who it is (checkpoint, matrix, axis…) and its
    metric ``values``."""
    ck = job.checkpoint
    rows, cols = pair.matrix_shape
    return {
        C.CHECKPOINT: shown(ck.label), C.METHOD: job.method, C.STEP: ck.step, C.NAME: pair.name,
        C.LAYER: layer_index(pair.name), C.MODULE: module_kind(pair.name), C.ROWS: rows,
        C.COLS: cols, C.AXIS: axis, C.EXPERT: pair.expert if pair.expert is not None
        else expert_index(pair.name),
        C.DTYPE: pair.tuned_dtype, C.TUNED_NAME: pair.tuned_name,
        # names that are not UTF-8, escaped: a table holds text
        C.REF: shown(ck.ref), C.BASE: shown(job.base), **values,
    }


def warn_nonfinite(ck: TunedCheckpoint, pair: MatrixPair, axis: str, values: dict) -> None:
    """Warn when a row counts vectors with NaN or Inf (left out of ΔM and ΔD)."""
    bad = values.get(C.NONFINITE_VECTORS)
    if bad:
        where = f" (expert {pair.expert})" if pair.expert is not None else ""
        warnings.warn(
            f"{ck.ref}: tensor '{pair.name}'{where} has {bad} of {values[C.N_VECTORS]} "
            f"vectors (axis {axis}) with NaN or Inf; they are excluded from delta_m/delta_d",
            NonFiniteWeightWarning,
            stacklevel=3,
        )


def table_columns(config: AnalysisConfig | None = None) -> list[str]:
    """Column order of the table: the contract's columns, then every enabled metric's."""
    extra = [c.name for c in registry.metric_columns(switches(config))
             if c.name not in C.TABLE_COLUMNS]
    return [*C.TABLE_COLUMNS, *extra]


def to_frame(records: list[dict], config: AnalysisConfig | None = None) -> pd.DataFrame:
    """Records → the analysis table with stable column order and typed columns."""
    import pandas as pd

    frame = pd.DataFrame.from_records(records, columns=table_columns(config))
    dtypes = C.TABLE_DTYPES | {c.name: c.dtype for c in registry.metric_columns(switches(config))}
    return frame.astype({k: v for k, v in dtypes.items() if k in frame.columns})


def switches(config: AnalysisConfig | None) -> tuple[str, ...] | None:
    """The metric switches ``config`` turns on; None (every metric) without a configuration."""
    return None if config is None else config.metrics
