"""Spectral drift and singular-subspace rotation of each matrix (``--drift``).

"The Path Not Taken" (arXiv 2511.08567) and "RL Is Neither a Panacea Nor a Mirage" (arXiv
2508.16546) ask how far fine-tuning moved a weight's singular spectrum and its principal
subspaces. With σ(W) the singular values in descending order and ``Uₖ`` (``Vₖ``) the top-k left
(right) singular vectors, output channels as rows:

* ``spectral_drift`` = ‖σ(Wt) − σ(W0)‖₂ / ‖σ(W0)‖₂, over all ``min(out, in)`` singular values;
* ``rotation_left`` = 1 − ‖U0ₖᵀ Utₖ‖²_F / k, the mean sin² of the principal angles between the
  top-k left singular subspaces of W0 and Wt (0: the same subspace; 1: orthogonal);
* ``rotation_right`` = the same for the right singular subspaces (``Vₖ``, the input space).

k is ``--drift-k`` (16), clamped to ``min(out, in)`` with a note. An adapter's Wt is merged
densely (its spectrum is not W0's plus the update's). Non-finite weights give NaN.

**Method and accuracy contract.** Each of W0 and Wt is decomposed once through the Gram matrix of
its smaller side (:func:`~.linalg.gram_spectrum`, shared with ``--spectrum``; on ``--device
cuda`` the GPU's ``eigh``): every eigenvalue λ̂ᵢ ≈ σᵢ², within δ (:func:`~.bounds.gram_error`),
and the top-k eigenvectors, refined once on W itself with Wedin's angle bound η
(:func:`~.bounds.subspace_error`). A fast result is used only where those bounds certify it:

* ``spectral_drift`` to :data:`DRIFT_RTOL` (1e-6) relative or :data:`DRIFT_ATOL` (1e-7)
  absolute, whichever is larger (:func:`~.bounds.norm_ratio_error` on the σ intervals). The
  absolute floor is float32's unit roundoff (6e-8) in scale: rounding Wt to float32 alone moves
  ‖σ(Wt) − σ(W0)‖ by up to u₃₂·‖Wt‖_F (Mirsky), so a smaller error is below what an fp32
  checkpoint resolves. The Gram bound cannot give 1e-6 relative on small drifts of square
  matrices (σ near 0 keep only √δ absolute; the 4096² benchmark pair: bound 2e-3 relative,
  actual error 6e-12), hence the floor; otherwise the σ come from a values-only dense SVD.
* ``rotation_left`` / ``rotation_right`` to :data:`ROTATION_ATOL` (1e-6) absolute
  (:func:`~.bounds.overlap_error`); where no gap separates σₖ from σₖ₊₁ (ties, k ≥ rank, a zero
  matrix) no bound exists and that matrix takes a dense SVD with vectors — whose top-k subspace
  is then just as arbitrary (:mod:`.subspaces`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .base import Column, Metric, Setting, positive_int
from .linalg import DEVICE

if TYPE_CHECKING:  # numpy and scipy load on first use: the CLI lists options fast
    import numpy as np
    import torch

    from ..pairs import PairView

SPECTRAL_DRIFT = "spectral_drift"
ROTATION_LEFT = "rotation_left"
ROTATION_RIGHT = "rotation_right"
COLUMNS = (SPECTRAL_DRIFT, ROTATION_LEFT, ROTATION_RIGHT)

DRIFT_K = Setting("drift_k", 16, "--drift: how many top singular vectors span the subspaces "
                  "whose rotation is measured", type=int, check=positive_int)
log = logging.getLogger("dora_analysis")


#: The accuracy contract (module docstring): a fast result is used only within these.
DRIFT_RTOL = 1e-6
DRIFT_ATOL = 1e-7
ROTATION_ATOL = 1e-6


@dataclass(frozen=True)
class Decomposition:
    """What ``--drift`` needs of one matrix W (out × in), with the error of each part."""

    sigma: np.ndarray
    """Every singular value, descending (``min(out, in)`` of them)."""
    sigma_error: np.ndarray
    """|σ̂ᵢ − σᵢ| ≤ this, per value (0: a dense SVD's, the reference)."""
    left: np.ndarray | None
    """Top-k left singular vectors (out × k), None when only values were asked for."""
    right: np.ndarray | None
    """Top-k right singular vectors (in × k)."""
    angle: float
    """Wedin's η: ‖sinΘ‖_F of either subspace is at most this (0: dense; inf: no bound)."""


def gram_decomposition(w: np.ndarray, k: int, device: torch.device) -> Decomposition:
    """σ from the eigenvalues of W's Gram matrix and, for ``k`` > 0, the top-k subspaces from
    its eigenvectors refined on W, each with its bound (:mod:`.bounds`)."""
    import numpy as np

    from .bounds import sigma_intervals, subspace_error
    from .linalg import gram_spectrum, one_blas_thread, tall

    with one_blas_thread():
        g = gram_spectrum(w, k, device)
        sigma = np.sqrt(np.maximum(g.eigenvalues, 0.0))
        lo, hi = sigma_intervals(g.eigenvalues, g.error)
        error = np.maximum(hi - sigma, sigma - lo)
        if k == 0:
            return Decomposition(sigma, error, None, None, 0.0)
        x, transposed = tall(w)
        n = x.shape[1]
        if not sigma[0] > 0:  # a zero matrix: no subspace is singled out
            return Decomposition(sigma, error, None, None, math.inf)
        sub = subspace_error(x, g.vectors[:, :k], hi[k] if k < n else 0.0)
    left, right = (sub.right, sub.left) if transposed else (sub.left, sub.right)
    return Decomposition(sigma, error, left, right, sub.angle)


def dense_decomposition(w: np.ndarray, k: int, device: torch.device) -> Decomposition:
    """The same from a dense float64 SVD on ``device`` (values only for ``k`` = 0)."""
    import numpy as np
    import torch

    from .linalg import dense_svd, one_blas_thread

    with one_blas_thread():
        u, s, v = dense_svd(torch.from_numpy(w), device, vectors=k > 0)
    sigma = s.numpy()
    if k == 0:
        return Decomposition(sigma, np.zeros_like(sigma), None, None, 0.0)
    return Decomposition(sigma, np.zeros_like(sigma), u[:, :k].numpy(), v[:, :k].numpy(), 0.0)


def drift_value(d0: Decomposition, dt: Decomposition) -> tuple[float, float]:
    """``(spectral_drift, bound on its error)`` from two decompositions (NaN, 0 when W0 = 0)."""
    import numpy as np

    from .bounds import norm_ratio_error, rounding

    num = float(np.linalg.norm(dt.sigma - d0.sigma))
    den = float(np.linalg.norm(d0.sigma))
    if not den > 0:
        return math.nan, 0.0 if not d0.sigma_error.any() else math.inf
    num_error = float(np.linalg.norm(d0.sigma_error + dt.sigma_error))
    den_error = float(np.linalg.norm(d0.sigma_error))
    value = num / den
    if num_error == den_error == 0.0:
        return value, 0.0
    slack = rounding(len(d0.sigma)) * (num + den)  # evaluating both norms
    return value, norm_ratio_error(num, num_error + slack, den, den_error + slack)


def certified_drift(x: np.ndarray, y: np.ndarray, k: int, device: torch.device
                    ) -> tuple[float, Decomposition, Decomposition]:
    """The spectral drift within the contract and both decompositions (subspaces within it
    too for ``k`` > 0): Gram-based where the bounds allow, dense SVDs where not."""
    from .bounds import overlap_error

    d = [gram_decomposition(x, k, device), gram_decomposition(y, k, device)]
    if k > 0:  # the subspaces first: a dense SVD with vectors brings exact values along
        while overlap_error(d[0].angle, d[1].angle, k, max(x.shape)) > ROTATION_ATOL:
            worst = 0 if d[0].angle >= d[1].angle else 1
            d[worst] = dense_decomposition((x, y)[worst], k, device)
    value, error = drift_value(*d)
    allowed = max(DRIFT_RTOL * value, DRIFT_ATOL) if math.isfinite(value) else 0.0
    if error > allowed:
        d = [with_dense_values(w, part, device) for w, part in zip((x, y), d, strict=True)]
        value, _ = drift_value(*d)
    return value, d[0], d[1]


def with_dense_values(w: np.ndarray, part: Decomposition, device: torch.device
                      ) -> Decomposition:
    """``part`` with exact singular values (a values-only dense SVD) where they were bounded."""
    if not part.sigma_error.any():
        return part
    values = dense_decomposition(w, 0, device)
    return replace(part, sigma=values.sigma, sigma_error=values.sigma_error)


def spectral_drift(w0: Any, wt: Any, *, device: Any = "cpu") -> float:
    """‖σ(Wt) − σ(W0)‖₂ / ‖σ(W0)‖₂ (NaN when W0 = 0 or either holds NaN/Inf), within the
    module's contract; ``device`` as ``--device``.

    Example:
        >>> import numpy as np
        >>> spectral_drift(np.diag([3.0, 4.0, 0.0])[:, :2], np.diag([3.0, 5.0, 0.0])[:, :2])
        0.2
    """
    import numpy as np

    from .arrays import float64
    from .linalg import resolve_device

    device = resolve_device(device)
    x, y = float64(w0), float64(wt)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"two matrices of one shape expected, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return certified_drift(x, y, 0, device)[0]


def clamped_k(k: int, shape: tuple[int, ...], what: str) -> int:
    """``k`` clamped to ``min(shape)``, with a note saying so."""
    limit = min(shape)
    if k > limit:
        log.info("%s: k = %d is more than min(out, in) = %d; using k = %d", what, k, limit, limit)
    return min(k, limit)


def weight_drift(w0: Any, wt: Any, k: int = 16, *, name: str = "matrix", device: Any = "cpu"
                 ) -> dict[str, float]:
    """``spectral_drift``, ``rotation_left`` and ``rotation_right`` of one pair ``(out, in)``
    (numpy or torch, any float dtype), within the module's contract. ``name`` labels the note
    when k is clamped; ``device`` as ``--device`` (``cpu``, ``cuda``, ``cuda:N``).

    Example:
        >>> import numpy as np
        >>> w0 = np.diag([3.0, 2.0, 1.0])[:, :2]          # (3, 2): non-square
        >>> d = weight_drift(w0, w0[:, ::-1], k=1)  # columns swapped: the input space turns
        >>> d["spectral_drift"], d["rotation_left"], d["rotation_right"]
        (0.0, 0.0, 1.0)
    """
    import numpy as np

    from .arrays import float64
    from .linalg import resolve_device

    device = resolve_device(device)
    x, y = float64(w0), float64(wt)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"two matrices of one shape expected, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return dict.fromkeys(COLUMNS, math.nan)
    k = clamped_k(k, x.shape, name)
    value, d0, dt = certified_drift(x, y, k, device)
    return {SPECTRAL_DRIFT: value,
            ROTATION_LEFT: rotation(d0.left, dt.left), ROTATION_RIGHT: rotation(d0.right, dt.right)}


def rotation(x: np.ndarray, y: np.ndarray) -> float:
    """``1 − ‖Xᵀ Y‖²_F / k`` in ``[0, 1]`` for orthonormal bases of k columns (rounding can
    push the overlap a hair past 1)."""
    from .subspaces import subspace_overlap

    return min(1.0, max(0.0, 1.0 - subspace_overlap(x, y)))


def drift_columns(view: PairView) -> dict[str, float]:
    """The ``--drift`` columns of one matrix pair."""
    from .linalg import resolve_device

    device = resolve_device(view.setting("device"))  # a missing GPU: before any read
    w0, wt = view.weights()
    name = view.pair.name if view.pair.expert is None else f"{view.pair.name}[{view.pair.expert}]"
    return weight_drift(w0, wt, view.setting("drift_k"), name=f"--drift-k, {name}",
                        device=device)


METRIC = Metric(
    name="drift",
    description="spectral drift of W and rotation of its top-k singular subspaces (arXiv "
                "2511.08567)",
    columns=(
        Column(SPECTRAL_DRIFT, "float64", "‖σ(Wt) − σ(W0)‖₂ / ‖σ(W0)‖₂", log_scale=True),
        Column(ROTATION_LEFT, "float64", "1 − ‖U0ₖᵀ Utₖ‖²_F / k: mean sin² of the principal "
               "angles between top-k left singular subspaces", log_scale=True),
        Column(ROTATION_RIGHT, "float64", "the same for the right (input-space) subspaces",
               log_scale=True),
    ),
    compute=drift_columns,
    option="drift",
    per_axis=False,
    cost="svd",
    settings=(DRIFT_K, DEVICE),
)
