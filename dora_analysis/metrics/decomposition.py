"""ΔM and ΔD (paper Eqs. 3-4) with their bookkeeping: the metric every table row has."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import columns as C
from .base import Column, Metric

if TYPE_CHECKING:
    from ..pairs import PairView


def decomposition(view: PairView) -> dict[str, float | int]:
    """Eq. 3 ``delta_m`` and Eq. 4 ``delta_d`` along the view's axis, degenerate vectors counted."""
    s = view.stats()
    return {C.DELTA_M: s.delta_m, C.DELTA_D: s.delta_d, C.ZERO_VECTORS: s.zero_vectors,
            C.N_VECTORS: s.n_vectors, C.NONFINITE_VECTORS: s.nonfinite_vectors,
            C.MEAN_M0: s.mean_m0}


METRIC = Metric(
    name="decomposition",
    description="magnitude and direction change (Eqs. 3-4)",
    columns=(
        Column(C.DELTA_M, "float64", "Eq. 3: mean |m_t − m_0| over vectors", log_scale=True),
        Column(C.DELTA_D, "float64", "Eq. 4: mean (1 − cos(W_t[n], W_0[n])) over vectors",
               log_scale=True),
        Column(C.ZERO_VECTORS, "int64", "vectors excluded for zero norm (no direction)"),
        Column(C.N_VECTORS, "int64", "vectors along the axis"),
        Column(C.NONFINITE_VECTORS, "int64", "vectors excluded for NaN/Inf"),
        Column(C.MEAN_M0, "float64", "mean base magnitude over valid vectors"),
    ),
    compute=decomposition,
)
