"""The metric registry: every per-matrix analysis the table can hold.

Adding a metric is one new module in this package (a function and its :class:`Metric`) and one
entry in :data:`METRICS`; the table's columns, the command-line switches and settings, the
correlation summary and the figures pick it up from here.
"""

from __future__ import annotations

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

__all__ = ["COSTS", "METRICS", "Column", "Metric", "Setting", "enabled", "metric_columns",
           "options", "settings"]


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
