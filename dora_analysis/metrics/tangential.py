"""The radial/tangential split of each vector's change: how much of ΔM a sideways step explains.

For a base vector ``w0`` and its change ``Δw = wt − w0``, the radial part is ``a = ⟨Δw, ŵ0⟩`` and
the tangential part ``t = ‖Δw − a·ŵ0‖``, so ``‖Δw‖² = a² + t²``. A purely tangential step still
raises the norm (``‖wt‖ = √((‖w0‖ + a)² + t²)``) — the mechanical coupling of ΔM and ΔD — while
``a`` and ``t`` themselves are orthogonal, first-order quantities. From the streaming sums:
``a = (‖wt‖² − ‖w0‖² − ‖Δw‖²) / (2‖w0‖)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Column, Metric

if TYPE_CHECKING:
    import numpy as np

    from ..decompose import VectorSums
    from ..pairs import PairView

TANGENTIAL_FRACTION = "tangential_fraction"


def tangential_share(sums: VectorSums) -> np.ndarray:
    """``t² / ‖Δw‖²`` per vector, in ``[0, 1]``; NaN where the vector did not change or has no
    direction (zero base norm) or holds NaN/Inf."""
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        radial = (sums.sqt - sums.sq0 - sums.sqd) / (2.0 * np.sqrt(sums.sq0))
        share = np.clip(1.0 - np.square(radial) / sums.sqd, 0.0, 1.0)
    valid = (sums.sq0 > 0) & (sums.sqd > 0) & np.isfinite(share)
    return np.where(valid, share, np.nan)


def tangential_fraction(view: PairView) -> dict[str, float]:
    """Mean over vectors of the share of ``‖Δw‖²`` orthogonal to ``w0`` (NaN if none changed)."""
    import numpy as np

    share = tangential_share(view.sums())
    valid = ~np.isnan(share)
    return {TANGENTIAL_FRACTION: float(share[valid].mean()) if valid.any() else float("nan")}


METRIC = Metric(
    name="tangential",
    description="share of each vector's change orthogonal to the base vector (sideways step)",
    columns=(Column(TANGENTIAL_FRACTION, "float64",
                    "mean over vectors of ‖Δw ⟂ w0‖² / ‖Δw‖²: 1 = pure rotation, 0 = pure "
                    "rescale"),),
    compute=tangential_fraction,
)
