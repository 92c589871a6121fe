"""The metric registry, and every metric as a plain function of arrays.

Adding a metric is one new module in this package (a function and its :class:`Metric`) and one
entry in :data:`METRICS`; the table's columns, the command-line switches and settings, the
correlation summary and the figures pick it up from here.

For notebooks, each measure is also a function of numpy arrays or torch tensors (any float
dtype, bfloat16 included; output channels as rows; LoRA factors ``(B, A, scale)`` where a closed
form exists), importable from here — the registry entries call the same functions::

    from dora_analysis.metrics import update_sparsity, weight_drift, update_cosine
    update_sparsity(w0_bf16, wt_bf16)                  # --sparsity's four columns
    update_cosine((b1, a1, s1), (b2, a2, s2))          # from the factors, no B·A

They load on first use (``import dora_analysis`` and ``dora-analyze --help`` stay light).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import (
    decomposition,
    drift,
    health,
    intruders,
    radial,
    sparsity,
    spectrum,
    tangential,
    weightwatcher,
)
from .base import COSTS, Column, Metric, Setting

if TYPE_CHECKING:
    from ..config import AnalysisConfig

#: Every metric, in column order. ``decomposition`` (Eqs. 3-4) always comes first.
METRICS: tuple[Metric, ...] = (
    decomposition.METRIC,
    tangential.METRIC,
    radial.METRIC,
    health.METRIC,
    spectrum.METRIC,
    intruders.METRIC,
    sparsity.METRIC,
    drift.METRIC,
    weightwatcher.METRIC,
)

#: The array functions: public name → the module of this package that defines it.
FUNCTIONS: dict[str, str] = {
    # --sparsity (Mukherjee et al. 2025) and the storage helpers it rests on
    "update_sparsity": "sparsity", "unchanged_mask": "sparsity", "merged_weight": "sparsity",
    "ulp": "arrays", "rounded": "arrays", "stored": "arrays", "Stored": "arrays",
    # --drift (arXiv 2511.08567)
    "weight_drift": "drift", "spectral_drift": "drift",
    # the cross-run table (dora_analysis.compare_runs)
    "update_cosine": "similarity", "subspace_similarity": "similarity",
    "sign_conflict": "similarity", "mask_jaccard": "similarity", "trim_mask": "similarity",
    "inner": "similarity", "Factors": "similarity",
    # --weightwatcher (calls the weightwatcher library)
    "esd_alpha": "weightwatcher",
    # any registry metric on two in-memory matrices (or W0 and LoRA factors), through the
    # table's own per-pair step: dora_analysis.tensors
    "measure": "..tensors", "tangential_fraction": "..tensors", "delta_m_split": "..tensors",
    "health_warnings": "..tensors", "update_spectrum": "..tensors",
    "count_intruders": "..tensors",
}

__all__ = ["COSTS", "METRICS", "Column", "Metric", "Setting", "enabled", "metric_columns",
           "options", "settings", *FUNCTIONS]


def __getattr__(name: str):
    module = FUNCTIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'dora_analysis.metrics' has no attribute {name!r}")
    relative = module if module.startswith("..") else f".{module}"
    value = getattr(importlib.import_module(relative, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *FUNCTIONS})


def enabled(config: AnalysisConfig) -> list[Metric]:
    """The metrics a configuration computes, in registry order."""
    return [m for m in METRICS if m.enabled(config)]


def metric_columns(config: AnalysisConfig | None = None) -> list[Column]:
    """Columns of the enabled metrics (of every metric when ``config`` is None)."""
    return [c for m in (METRICS if config is None else enabled(config)) for c in m.columns]


def options() -> dict[str, Metric]:
    """Switch name → the optional metric it turns on."""
    return {m.option: m for m in METRICS if m.option is not None}


def settings() -> dict[str, Setting]:
    """Every metric setting by name."""
    return {s.name: s for m in METRICS for s in m.settings}
