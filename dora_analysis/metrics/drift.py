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
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from .base import Column, Metric, Setting, positive_int

if TYPE_CHECKING:  # numpy and scipy load on first use: the CLI lists options fast
    import numpy as np

    from ..pairs import PairView

SPECTRAL_DRIFT = "spectral_drift"
ROTATION_LEFT = "rotation_left"
ROTATION_RIGHT = "rotation_right"
COLUMNS = (SPECTRAL_DRIFT, ROTATION_LEFT, ROTATION_RIGHT)

DRIFT_K = Setting("drift_k", 16, "--drift: how many top singular vectors span the subspaces "
                  "whose rotation is measured", type=int, check=positive_int)
log = logging.getLogger("dora_analysis")


def spectral_drift(w0: Any, wt: Any) -> float:
    """‖σ(Wt) − σ(W0)‖₂ / ‖σ(W0)‖₂ (NaN when W0 = 0 or either holds NaN/Inf).

    Example:
        >>> import numpy as np
        >>> spectral_drift(np.diag([3.0, 4.0, 0.0])[:, :2], np.diag([3.0, 5.0, 0.0])[:, :2])
        0.2
    """
    import numpy as np

    from .arrays import float64
    from .subspaces import singular_values

    x, y = float64(w0), float64(wt)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    s0, st = singular_values(x), singular_values(y)
    norm = float(np.linalg.norm(s0))
    return float(np.linalg.norm(st - s0)) / norm if norm > 0 else math.nan


def clamped_k(k: int, shape: tuple[int, ...], what: str) -> int:
    """``k`` clamped to ``min(shape)``, with a note saying so."""
    limit = min(shape)
    if k > limit:
        log.info("%s: k = %d is more than min(out, in) = %d; using k = %d", what, k, limit, limit)
    return min(k, limit)


def weight_drift(w0: Any, wt: Any, k: int = 16, *, name: str = "matrix") -> dict[str, float]:
    """``spectral_drift``, ``rotation_left`` and ``rotation_right`` of one pair ``(out, in)``
    (numpy or torch, any float dtype). ``name`` labels the note when k is clamped.

    Example:
        >>> import numpy as np
        >>> w0 = np.diag([3.0, 2.0, 1.0])[:, :2]          # (3, 2): non-square
        >>> d = weight_drift(w0, w0[:, ::-1], k=1)  # columns swapped: the input space turns
        >>> d["spectral_drift"], d["rotation_left"], d["rotation_right"]
        (0.0, 0.0, 1.0)
    """
    import numpy as np

    from .arrays import float64
    from .subspaces import top_singular

    x, y = float64(w0), float64(wt)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"two matrices of one shape expected, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return dict.fromkeys(COLUMNS, math.nan)
    k = clamped_k(k, x.shape, name)
    u0, _, v0 = top_singular(x, k)
    ut, _, vt = top_singular(y, k)
    return {SPECTRAL_DRIFT: spectral_drift(x, y),
            ROTATION_LEFT: rotation(u0, ut), ROTATION_RIGHT: rotation(v0, vt)}


def rotation(x: np.ndarray, y: np.ndarray) -> float:
    """``1 − ‖Xᵀ Y‖²_F / k`` in ``[0, 1]`` for orthonormal bases of k columns (rounding can
    push the overlap a hair past 1)."""
    from .subspaces import subspace_overlap

    return min(1.0, max(0.0, 1.0 - subspace_overlap(x, y)))


def drift_columns(view: PairView) -> dict[str, float]:
    """The ``--drift`` columns of one matrix pair."""
    w0, wt = view.weights()
    name = view.pair.name if view.pair.expert is None else f"{view.pair.name}[{view.pair.expert}]"
    return weight_drift(w0, wt, view.config.setting("drift_k"), name=f"--drift-k, {name}")


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
    settings=(DRIFT_K,),
)
