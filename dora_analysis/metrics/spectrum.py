"""The spectrum of the update ΔW = Wt − W0 of each matrix: how large, how low-rank (``--spectrum``).

From the singular values σ₁ ≥ σ₂ ≥ … of ΔW (output channels as rows):

* ``update_norm`` = ‖ΔW‖_F = √(Σσᵢ²); ``relative_update`` = ‖ΔW‖_F / ‖W0‖_F;
* ``sigma_1`` = σ₁ (the spectral norm); ``stable_rank`` = ‖ΔW‖_F² / σ₁²;
* ``effective_rank`` = exp(H(p)), pᵢ = σᵢ / Σσⱼ (Roy & Vetterli, "The effective rank", EUSIPCO
  2007);
* ``energy_rank_90`` = the smallest k with σ₁² + … + σₖ² ≥ 0.9 ‖ΔW‖_F² (Biderman et al., "LoRA
  Learns Less and Forgets Less", TMLR 2024);
* ``amplification`` = ‖ΔW‖_F / ‖Uᵀ W0 V‖_F, U and V the top-r left and right singular vectors of
  ΔW (Hu et al., "LoRA", ICLR 2022, §7.3), r = the adapter's rank, else ``--amplification-rank``
  (16). How much ΔW amplifies directions W0 holds only weakly: large = new directions.

How (``--device`` chooses the CPU or a GPU):

* A LoRA adapter's ΔW = s·B·A is decomposed exactly from its r × r core (no dense SVD, no B·A).
* Full checkpoints and DoRA (whose ΔW is not low-rank): the eigenvalues of the float64 Gram
  matrix of ΔW's smaller side (σᵢ², one ``syrk`` and one tridiagonalisation) and its top-r
  eigenvectors, refined once on ΔW itself for the amplification — about a sixth of a dense SVD
  with vectors. Squaring loses accuracy in the small σᵢ, so every column is **certified** first:
  :mod:`.bounds` bounds each one's error from the computed values (Weyl, Ky Fan, Wedin), and
  only results within :data:`~.bounds.TOLERANCE` (9e-7 relative; the same energy rank) are used.
  A matrix that cannot be certified (σ's that matter below √(u·‖ΔW‖_F²), no gap after σ_r, an
  energy share on the 90 % line) takes the dense float64 SVD, as before.

ΔW = 0 gives norms 0 and NaN ranks (no spectrum to rank); non-finite weights give NaN throughout.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .base import Column, Metric, Setting, positive_int
from .linalg import DEVICE

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..pairs import PairView

UPDATE_NORM = "update_norm"
RELATIVE_UPDATE = "relative_update"
SIGMA_1 = "sigma_1"
STABLE_RANK = "stable_rank"
EFFECTIVE_RANK = "effective_rank"
ENERGY_RANK_90 = "energy_rank_90"
AMPLIFICATION = "amplification"
#: Share of ‖ΔW‖_F² that ``energy_rank_90`` must hold.
ENERGY = 0.9

AMPLIFICATION_RANK = Setting("amplification_rank", 16, "rank r of the top singular subspace of "
                             "ΔW for --spectrum's amplification when the checkpoint is not an "
                             "adapter (adapters use their own rank)", type=int,
                             check=positive_int)


def spectral_summary(s: torch.Tensor) -> dict[str, float]:
    """Norm and ranks from the singular values ``s`` of ΔW (any order, float64).

    Example:
        >>> import torch
        >>> d = spectral_summary(torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64))
        >>> d["update_norm"], d["stable_rank"], d["energy_rank_90"]
        (5.0, 1.5625, 2)
    """
    import torch

    s = torch.sort(s.to(torch.float64).abs(), descending=True).values
    energy = s.square()
    total = float(energy.sum())
    out = {UPDATE_NORM: math.sqrt(total), SIGMA_1: float(s[0]) if len(s) else 0.0,
           STABLE_RANK: math.nan, EFFECTIVE_RANK: math.nan, ENERGY_RANK_90: math.nan}
    if total == 0.0 or not math.isfinite(total):
        return out
    out[STABLE_RANK] = total / float(s[0]) ** 2
    p = s[s > 0] / s.sum()
    out[EFFECTIVE_RANK] = float(torch.exp(-(p * p.log()).sum()))
    # A hair of tolerance: k equal singular values hold exactly i/k of the energy each step.
    share = torch.cumsum(energy, 0) / total
    out[ENERGY_RANK_90] = int(torch.searchsorted(share, ENERGY * (1 - 1e-12))) + 1
    return out


def amplification(w0: torch.Tensor, u: torch.Tensor, v: torch.Tensor, update_norm: float
                  ) -> float:
    """LoRA §7.3: ``‖ΔW‖_F / ‖Uᵀ W0 V‖_F`` for ΔW's top singular vectors ``U`` (out × r) and
    ``V`` (in × r); NaN when W0 has no energy in that subspace or ΔW = 0."""
    projected = float((u.T @ (w0 @ v)).norm())  # (r, r); O(out·in·r)
    if projected == 0.0 or update_norm == 0.0:
        return math.nan
    return update_norm / projected


def _nan_row() -> dict[str, float]:
    return dict.fromkeys((UPDATE_NORM, RELATIVE_UPDATE, SIGMA_1, STABLE_RANK, EFFECTIVE_RANK,
                          ENERGY_RANK_90, AMPLIFICATION), math.nan)


def dense_columns(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, w0: torch.Tensor,
                  rank: int) -> dict[str, float]:
    """The columns from a thin SVD ``(U, S, V)`` of ΔW (exact core or dense), W0 for the
    amplification."""
    import torch

    out = spectral_summary(s)
    # Singular vectors of zero singular values are arbitrary: keep the numerically non-zero ones.
    tol = float(s.max()) * max(w0.shape) * torch.finfo(torch.float64).eps if len(s) else 0.0
    r = min(rank, int((s > tol).sum()))
    out[AMPLIFICATION] = (amplification(w0, u[:, :r], v[:, :r], out[UPDATE_NORM]) if r
                          else math.nan)
    return out


def gram_columns(delta: np.ndarray, w0: np.ndarray, rank: int, device: torch.device
                 ) -> dict[str, float] | None:
    """The columns from the Gram matrix of ΔW (see the module docstring), or None when the
    bounds of :mod:`.bounds` cannot certify every one of them."""
    import numpy as np
    import torch

    from .bounds import (
        TOLERANCE,
        U64,
        effective_rank_error,
        energy_rank,
        projection_error,
        rounding,
        sigma_intervals,
        subspace_error,
    )
    from .linalg import gram_spectrum, one_blas_thread, tall

    with one_blas_thread():
        g = gram_spectrum(delta, rank, device)
        lam, total, n = g.eigenvalues, g.frobenius_sq, len(g.eigenvalues)
        if total == 0.0:  # ΔW = 0 exactly: its Gram matrix is 0 too
            return spectral_summary(torch.zeros(n, dtype=torch.float64)) | {
                AMPLIFICATION: math.nan}
        sigma = np.sqrt(np.maximum(lam, 0.0))
        lo, hi = sigma_intervals(lam, g.error)
        total_error = rounding(max(delta.shape))  # of the trace: sums of squares
        if lo[0] <= 0:
            return None
        k90 = energy_rank(lam, total, ENERGY, g.error, total_error)
        errors = (
            max(hi[0] - sigma[0], sigma[0] - lo[0]) / lo[0],  # σ₁
            max(total * (1 + total_error) / lo[0] ** 2 - total / lam[0],  # stable rank
                total / lam[0] - total * (1 - total_error) / hi[0] ** 2) / (total / lam[0]),
            effective_rank_error(sigma, lo, hi),
        )
        if k90 is None or max(errors) > TOLERANCE:
            return None
        out = spectral_summary(torch.from_numpy(sigma))
        out[UPDATE_NORM], out[STABLE_RANK] = math.sqrt(total), total / lam[0]
        out[ENERGY_RANK_90] = k90
        r = min(rank, n)
        # The dense path keeps σ above σ₁·max(shape)·ε as "non-zero": the r must be certain.
        if r == 0 or lo[r - 1] <= sigma[0] * max(delta.shape) * 2 * U64:
            return None
        x, transposed = tall(delta)
        w0x = w0.T if transposed else w0
        sub = subspace_error(x, g.vectors[:, :r], hi[r] if r < n else 0.0)
        projected = float(np.linalg.norm(sub.left.T @ (w0x @ sub.right)))
        if projection_error(w0x, sub, projected) > TOLERANCE:
            return None
    out[AMPLIFICATION] = out[UPDATE_NORM] / projected
    return out


def delta_svd(view: PairView, device: object, *, vectors: bool = True
              ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None:
    """Thin SVD ``(U, S, V)`` of ΔW in float64: exact from the r × r core for a LoRA adapter
    (``device`` unused), a dense SVD on ``device`` otherwise; None when ΔW holds NaN/Inf."""
    import torch

    from .linalg import dense_svd, low_rank_svd, resolve_device

    lora = view.low_rank()
    if lora is not None:  # ΔW = s·B·A exactly: its SVD from the r × r core
        a, b = lora.factors()
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            return None
        return low_rank_svd(b, a, lora.scale)
    device = resolve_device(device)  # a missing GPU is an error before anything is read
    delta = view.delta()
    if not bool(torch.isfinite(delta).all()):
        return None
    return dense_svd(delta, device, vectors=vectors)


def spectrum(view: PairView) -> dict[str, float]:
    """The spectral columns of one matrix pair (see the module docstring)."""
    import torch

    from .linalg import resolve_device

    sums = next(iter(view.sums_by_axis.values()))
    base_energy = float(sums.sq0.sum())  # ‖W0‖_F², the same along either axis
    update = view.low_rank() or view.adapter_update()  # an adapter's ΔW: its own rank
    rank = update.rank if update is not None and update.rank else int(
        view.setting("amplification_rank"))
    out = None
    if view.low_rank() is None:  # dense ΔW: from its Gram matrix where the bounds allow
        device = resolve_device(view.setting("device"))  # before anything is read
        delta = view.delta()
        if not bool(torch.isfinite(delta).all()):
            return _nan_row()
        out = gram_columns(delta.numpy(), view.base_weight().numpy(), rank, device)
    if out is None:
        svd = delta_svd(view, view.setting("device"))
        if svd is None:
            return _nan_row()
        out = dense_columns(*svd, view.base_weight(), rank)
    out[RELATIVE_UPDATE] = (out[UPDATE_NORM] / math.sqrt(base_energy) if base_energy > 0
                            else math.nan)
    return out


METRIC = Metric(
    name="spectrum",
    description="spectrum of ΔW: update_norm, relative_update, sigma_1, stable_rank, "
                "effective_rank, energy_rank_90, amplification",
    columns=(
        Column(UPDATE_NORM, "float64", "‖ΔW‖_F", log_scale=True),
        Column(RELATIVE_UPDATE, "float64", "‖ΔW‖_F / ‖W0‖_F", log_scale=True),
        Column(SIGMA_1, "float64", "largest singular value of ΔW", log_scale=True),
        Column(STABLE_RANK, "float64", "‖ΔW‖_F² / σ₁²"),
        Column(EFFECTIVE_RANK, "float64", "exp(entropy of σᵢ / Σσ) (Roy & Vetterli 2007)"),
        Column(ENERGY_RANK_90, "Int64", "smallest k whose top-k σᵢ² hold 90 % of ‖ΔW‖_F²"),
        Column(AMPLIFICATION, "float64", "‖ΔW‖_F / ‖Uᵀ W0 V‖_F, top-r singular vectors of ΔW "
               "(LoRA §7.3)", log_scale=True),
    ),
    compute=spectrum,
    option="spectrum",
    per_axis=False,
    cost="svd",
    settings=(AMPLIFICATION_RANK, DEVICE),
)
