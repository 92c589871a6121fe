"""ΔM split into what the radial and the sideways part of each vector's step would cause alone.

With ``Δw = a·ŵ0 + t`` (``a`` radial, ``t ⟂ w0``, as in :mod:`.tangential`), the new norm is
``√((ρ + a)² + ‖t‖²)`` for base norm ``ρ``, so ``Δm ≈ a + ‖t‖²/(2ρ)``: a first-order radial term,
and a second-order term that any sideways step brings however the weights are trained — the
mechanical coupling of ΔM to ΔD (``‖t‖²/(2ρ) ≈ ρ·(1 − cos)``). Per matrix, averaged over vectors
like Eq. 3:

* ``delta_m_radial`` = mean ``|a|`` — ΔM had the step been purely radial;
* ``delta_m_sideways`` = mean ``(√(ρ² + ‖t‖²) − ρ)`` — ΔM had it been purely sideways.

When ``delta_m_sideways`` ≈ ΔM, the magnitude change is the geometric by-product of turning and
ΔM, ΔD must correlate positively; when ``delta_m_radial`` ≈ ΔM, the norms moved on their own.
From the streaming sums: ``a = (‖wt‖² − ‖w0‖² − ‖Δw‖²) / (2ρ)``, ``‖t‖² = ‖Δw‖² − a²``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Column, Metric

if TYPE_CHECKING:
    import numpy as np

    from ..decompose import VectorSums
    from ..pairs import PairView

DELTA_M_RADIAL = "delta_m_radial"
DELTA_M_SIDEWAYS = "delta_m_sideways"


def radial_sideways(sums: VectorSums) -> tuple[np.ndarray, np.ndarray]:
    """Per vector, ``(a, √(ρ² + ‖t‖²) − ρ)`` in float64; NaN for the vectors Eq. 3 leaves out
    (zero base or tuned norm, NaN/Inf).

    Example:
        >>> import numpy as np
        >>> from dora_analysis.decompose import PairAccumulator
        >>> acc = PairAccumulator(1, 2)
        >>> acc.add(np.array([[3.0, 0.0]]), np.array([[4.0, 1.0]]))  # a = 1, t = 1
        >>> [round(float(x[0]), 6) for x in radial_sideways(acc.sums()["out"])]
        [1.0, 0.162278]
    """
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.sqrt(sums.sq0)
        radial = (sums.sqt - sums.sq0 - sums.sqd) / (2.0 * rho)
        t2 = np.maximum(sums.sqd - np.square(radial), 0.0)
        sideways = t2 / (np.sqrt(sums.sq0 + t2) + rho)  # √(ρ² + t²) − ρ without cancellation
    valid = (sums.sq0 > 0) & (sums.sqt > 0) & np.isfinite(radial) & np.isfinite(sideways)
    return np.where(valid, radial, np.nan), np.where(valid, sideways, np.nan)


def delta_m_split(view: PairView) -> dict[str, float]:
    """``delta_m_radial`` and ``delta_m_sideways`` of one matrix along the view's axis."""
    import numpy as np

    radial, sideways = radial_sideways(view.sums())
    valid = ~np.isnan(radial)
    if not valid.any():
        return {DELTA_M_RADIAL: float("nan"), DELTA_M_SIDEWAYS: float("nan")}
    return {DELTA_M_RADIAL: float(np.abs(radial[valid]).mean()),
            DELTA_M_SIDEWAYS: float(sideways[valid].mean())}


METRIC = Metric(
    name="delta_m_split",
    description="ΔM as the radial and the sideways part of each step would cause it alone",
    columns=(
        Column(DELTA_M_RADIAL, "float64", "mean |⟨Δw, ŵ0⟩|: ΔM of the radial part alone",
               log_scale=True),
        Column(DELTA_M_SIDEWAYS, "float64", "mean (√(ρ² + ‖Δw ⟂ w0‖²) − ρ): ΔM of the sideways "
               "part alone (≈ ρ·(1 − cos))", log_scale=True),
    ),
    compute=delta_m_split,
)
