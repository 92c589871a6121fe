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
    import torch

    from ..decompose import VectorSums
    from ..pairs import PairView

TANGENTIAL_FRACTION = "tangential_fraction"


def tangential_share(sums: VectorSums) -> torch.Tensor:
    """``t² / ‖Δw‖²`` per vector, in ``[0, 1]``; NaN where the vector did not change or has no
    direction (zero base norm) or holds NaN/Inf."""
    import torch

    radial = (sums.sqt - sums.sq0 - sums.sqd) / (2.0 * sums.sq0.sqrt())
    share = (1.0 - radial.square() / sums.sqd).clamp(0.0, 1.0)
    valid = (sums.sq0 > 0) & (sums.sqd > 0) & torch.isfinite(share)
    return torch.where(valid, share, torch.nan)


def tangential_fraction(view: PairView) -> dict[str, float]:
    """Mean over vectors of the share of ``‖Δw‖²`` orthogonal to ``w0`` (NaN if none changed)."""
    share = tangential_share(view.sums())
    valid = ~share.isnan()
    return {TANGENTIAL_FRACTION: float(share[valid].mean()) if valid.any() else float("nan")}


METRIC = Metric(
    name="tangential",
    description="share of each vector's change orthogonal to the base vector (sideways step)",
    columns=(Column(TANGENTIAL_FRACTION, "float64",
                    "mean over vectors of ‖Δw ⟂ w0‖² / ‖Δw‖²: 1 = pure rotation, 0 = pure "
                    "rescale"),),
    compute=tangential_fraction,
)
