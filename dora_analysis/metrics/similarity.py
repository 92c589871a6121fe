"""How similar two runs' updates of one matrix are: the measures of the cross-run table
(:func:`dora_analysis.compare_runs`).

An update is ΔW = Wt − W0 in float64, output channels as rows: a dense array, or a LoRA adapter's
factors :class:`Factors` (ΔW = s·B·A, used as that product, never as the concatenated factors,
whose cosine is not BA's — tanganke/peta#4).

* ``update_cosine`` = cos(vec ΔW_a, vec ΔW_b) — per-layer task-vector cosine (Ilharco et al.,
  "Editing Models with Task Arithmetic", ICLR 2023). From factors, ⟨s_a B_a A_a, s_b B_b A_b⟩ =
  s_a s_b tr((B_aᵀ B_b)(A_b A_aᵀ)): no m × n product.
* ``subspace_similarity`` = ‖U_aₖᵀ U_bₖ‖²_F / k, U the top-k left singular vectors of ΔW (Hu et
  al., "LoRA", ICLR 2022, §7.2 Eq. 4 with i = j = k; on ΔW's output space rather than on A,
  which is not identifiable). From factors, U comes exactly from the r × r core of a QR of B and
  Aᵀ. k is clamped to the smaller numerical rank of the two updates.
* ``sign_conflict`` — TIES-merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708): each ΔW is
  trimmed as TIES' ``topk_values_mask`` does, per matrix (keep the entries with |ΔW| ≥ the m-th
  smallest |ΔW|, m = N − ⌊trim·N⌋, ties kept: the top ``trim`` share); among the entries kept
  and non-zero in both, the share whose signs are opposite. Needs the dense ΔW: an adapter's is
  materialised whole (s·B·A, one matrix at a time).
* ``mask_jaccard`` — |C_a ∩ C_b| / |C_a ∪ C_b| for the sets of elements whose stored value
  changed (:func:`dora_analysis.metrics.sparsity.unchanged_mask`); 1 when both sets are empty
  (two equal sets: a run compared with itself always scores 1). Mukherjee et al. (arXiv
  2505.11711) report that RL's updated subnetworks overlap across seeds.

Every function returns NaN where its quantity is undefined (a zero update, nothing kept).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import columns as C
from .arrays import float64
from .base import CROSS_RUN_K, CROSS_RUN_TRIM
from .subspaces import numerical_rank, subspace_overlap, top_singular

MEASURES = C.CROSS_RUN_MEASURES
#: TIES-merging's default: keep the top 20 % of each task vector by magnitude.
DEFAULT_TRIM = CROSS_RUN_TRIM
DEFAULT_K = CROSS_RUN_K
log = logging.getLogger("dora_analysis")


@dataclass(frozen=True)
class Factors:
    """ΔW = scale · B @ A (B out × r, A r × in), float64: a LoRA adapter's update."""

    b: np.ndarray
    a: np.ndarray
    scale: float

    @classmethod
    def of(cls, b: Any, a: Any, scale: float) -> Factors:
        """From numpy arrays or torch tensors of any float dtype."""
        b, a = float64(b), float64(a)
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"B (out × r) and A (r × in) expected, got {b.shape} and {a.shape}")
        return cls(b, a, float(scale))

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    def dense(self) -> np.ndarray:
        """s·B·A, (out, in)."""
        return self.scale * (self.b @ self.a)

    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact thin SVD ``(U, σ, V)`` of s·B·A from its core: B = Q_B R_B, Aᵀ = Q_A R_A, so
        s·B·A = Q_B (s R_B R_Aᵀ) Q_Aᵀ and the core's SVD rotates the two bases. O((m + n)·r²)."""
        qb, rb = np.linalg.qr(self.b)  # (out, r), (r, r)
        qa, ra = np.linalg.qr(self.a.T)  # (in, r), (r, r)
        uc, s, vch = np.linalg.svd(self.scale * rb @ ra.T)
        return qb @ uc, s, qa @ vch.T


Update = np.ndarray | Factors


def as_update(x: Any) -> Update:
    """A dense ΔW (numpy or torch, any float dtype) as float64, or factors: a :class:`Factors`
    or a tuple ``(B, A, scale)``."""
    if isinstance(x, Factors):
        return x
    if isinstance(x, tuple) and len(x) == 3:
        return Factors.of(*x)
    delta = float64(x)
    if delta.ndim != 2:
        raise ValueError(f"ΔW must be a matrix (out, in), got shape {delta.shape}")
    return delta


def dense(x: Any) -> np.ndarray:
    """ΔW as a dense float64 array (factors multiplied out)."""
    x = as_update(x)
    return x.dense() if isinstance(x, Factors) else x


def inner(x: Any, y: Any) -> float:
    """The Frobenius inner product ⟨ΔW_x, ΔW_y⟩, from factors without an m × n product.

    Example:
        >>> b, a = np.array([[1.0], [2.0]]), np.array([[3.0, 0.0, 1.0]])
        >>> inner((b, a, 2.0), (b, a, 2.0)) == float(np.sum((2.0 * b @ a) ** 2))
        True
    """
    x, y = as_update(x), as_update(y)
    if x.shape != y.shape:
        raise ValueError(f"updates of different shapes: {x.shape} vs {y.shape}")
    if isinstance(x, Factors) and isinstance(y, Factors):  # s s' tr((Bᵀ B')(A' Aᵀ))
        return float(x.scale * y.scale * np.sum((x.b.T @ y.b) * (x.a @ y.a.T)))
    if isinstance(y, Factors):
        x, y = y, x
    if isinstance(x, Factors):  # s tr(Bᵀ Y Aᵀ) = s Σ B ⊙ (Y Aᵀ)
        return float(x.scale * np.sum(x.b * (y @ x.a.T)))
    return float(x.ravel() @ y.ravel())


def update_cosine(x: Any, y: Any) -> float:
    """cos(vec ΔW_x, vec ΔW_y) in [−1, 1]; NaN when either update is zero.

    Example:
        >>> d = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
        >>> update_cosine(d, d), update_cosine(d, -d)
        (1.0, -1.0)
    """
    norms = inner(x, x) * inner(y, y)
    if not norms > 0 or not math.isfinite(norms):
        return math.nan
    return max(-1.0, min(1.0, inner(x, y) / math.sqrt(norms)))


def left_basis(x: Any, k: int) -> tuple[np.ndarray, int]:
    """The top-``k`` left singular vectors of ΔW (out × ≤ k) and ΔW's numerical rank among
    them (how many of those vectors belong to non-zero singular values)."""
    x = as_update(x)
    if isinstance(x, Factors):
        u, s, _ = x.svd()
    else:
        u, s, _ = top_singular(x, k)
    return u[:, :k], numerical_rank(s, x.shape)


def similarity_of_bases(u_a: np.ndarray, rank_a: int, u_b: np.ndarray, rank_b: int, k: int
                        ) -> tuple[float, int]:
    """``(‖U_aₖᵀ U_bₖ‖²_F / k, k)`` with k clamped to both ranks; NaN and 0 when either update
    is zero."""
    used = min(k, rank_a, rank_b)
    if used == 0:
        return math.nan, 0
    return min(1.0, subspace_overlap(u_a[:, :used], u_b[:, :used])), used


def subspace_similarity(x: Any, y: Any, k: int = DEFAULT_K, *, name: str = "matrix") -> float:
    """‖U_xₖᵀ U_yₖ‖²_F / k for the top-k left singular vectors of the two updates (LoRA §7.2
    Eq. 4, i = j = k), k clamped to the smaller rank with a note labelled ``name``.

    Example:
        >>> d = np.diag([3.0, 2.0, 1.0])[:, :2]      # (3, 2), rank 2
        >>> subspace_similarity(d, d, k=1), subspace_similarity(d, d[[1, 0, 2]], k=1)
        (1.0, 0.0)
    """
    u_x, rank_x = left_basis(x, k)
    u_y, rank_y = left_basis(y, k)
    value, used = similarity_of_bases(u_x, rank_x, u_y, rank_y, k)
    if used < k:
        log.info("%s: k = %d is more than the rank of ΔW (%d and %d); using k = %d", name, k,
                 rank_x, rank_y, used)
    return value


def trim_mask(x: Any, trim: float = DEFAULT_TRIM) -> np.ndarray:
    """TIES' ``topk_values_mask`` on one matrix: |ΔW| ≥ its m-th smallest value, m = N −
    ⌊trim·N⌋ (at least 1), ties kept — the top ``trim`` share by magnitude (⌊trim·N⌋ + 1
    entries without ties, as TIES' ``kthvalue`` keeps them).

    Example:
        >>> trim_mask(np.array([[1.0, -4.0, 2.0, 3.0, 0.0]]), 0.4).astype(int).tolist()
        [[0, 1, 1, 1, 0]]
    """
    magnitude = np.abs(dense(x))
    n = magnitude.size
    m = max(1, n - math.floor(trim * n))
    kth = np.partition(magnitude.ravel(), m - 1)[m - 1]
    return magnitude >= kth


def conflict_share(x: np.ndarray, y: np.ndarray, keep_x: np.ndarray, keep_y: np.ndarray
                   ) -> float:
    """Among entries kept in both and non-zero in both, the share of opposite signs (NaN when
    there is none)."""
    both = keep_x & keep_y & (x != 0) & (y != 0)
    count = int(both.sum())
    if count == 0 or not (np.isfinite(x[both]).all() and np.isfinite(y[both]).all()):
        return math.nan
    return float(np.count_nonzero(np.signbit(x[both]) != np.signbit(y[both])) / count)


def sign_conflict(x: Any, y: Any, trim: float = DEFAULT_TRIM) -> float:
    """TIES-merging's sign conflict of two updates of one matrix, each trimmed to its top
    ``trim`` share by magnitude (:func:`trim_mask`).

    Example:
        >>> d = np.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
        >>> sign_conflict(d, d, 0.5), sign_conflict(d, -d, 0.5)
        (0.0, 1.0)
    """
    x, y = dense(x), dense(y)
    if x.shape != y.shape:
        raise ValueError(f"updates of different shapes: {x.shape} vs {y.shape}")
    return conflict_share(x, y, trim_mask(x, trim), trim_mask(y, trim))


def mask_jaccard(changed_a: Any, changed_b: Any) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks of changed elements; 1.0 when both are empty.

    Example:
        >>> mask_jaccard(np.array([True, True, False]), np.array([True, False, False]))
        0.5
    """
    a, b = np.asarray(changed_a, dtype=bool), np.asarray(changed_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes: {a.shape} vs {b.shape}")
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union
