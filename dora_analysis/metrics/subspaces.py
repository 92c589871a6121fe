"""Singular values and top singular subspaces of dense float64 matrices, and how two subspaces
overlap: what :mod:`.drift` and :mod:`.similarity` share.

Orientation: a matrix ``(out, in)`` has its output space on the left (columns of ``U``) and its
input space on the right (columns of ``V``). Singular vectors are defined up to sign and, inside
a group of equal singular values, up to rotation: only subspaces are compared, never vectors by
index (a tie between σₖ and σₖ₊₁ makes the top-k subspace itself arbitrary; nothing can fix that).
"""

from __future__ import annotations

import numpy as np

#: Below this many rows or columns (or with k close to it) a full SVD is as cheap as Lanczos.
LANCZOS_MIN_SIZE = 64


def singular_values(w: np.ndarray) -> np.ndarray:
    """All singular values of ``w``, descending, float64 (values-only LAPACK ``gesdd``)."""
    from scipy.linalg import svdvals

    return svdvals(np.asarray(w, dtype=np.float64), check_finite=False)


def top_singular(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-``k`` singular triplets ``(U (out × k), σ (k,), V (in × k))``, σ descending.

    ``k`` is clamped to ``min(out, in)``. Large matrices use ARPACK's Lanczos iteration (scipy
    ``svds``) with a fixed start vector, so results repeat; small ones a dense SVD.
    """
    w = np.asarray(w, dtype=np.float64)
    k = min(k, *w.shape)
    if min(w.shape) < max(LANCZOS_MIN_SIZE, k + 2):
        u, s, vh = np.linalg.svd(w, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    from scipy.sparse.linalg import svds

    start = np.random.default_rng(0).standard_normal(min(w.shape))
    u, s, vh = svds(w, k=k, v0=start, solver="arpack")
    order = np.argsort(s)[::-1]
    return u[:, order], s[order], vh[order].T


def numerical_rank(sigma: np.ndarray, shape: tuple[int, int]) -> int:
    """How many singular values exceed ``σ₁ · max(shape) · ε`` (numpy's ``matrix_rank`` rule)."""
    if not len(sigma) or not sigma[0] > 0:
        return 0
    return int((sigma > sigma[0] * max(shape) * np.finfo(np.float64).eps).sum())


def subspace_overlap(x: np.ndarray, y: np.ndarray) -> float:
    """``‖Xᵀ Y‖²_F / k`` for orthonormal bases ``X``, ``Y`` of k columns each: the mean cos² of
    the principal angles between the two subspaces (1 = the same subspace, 0 = orthogonal);
    LoRA §7.2 Eq. 4's φ with i = j = k.

    Example:
        >>> e = np.eye(3)
        >>> subspace_overlap(e[:, :2], e[:, :2]), subspace_overlap(e[:, :1], e[:, 1:2])
        (1.0, 0.0)
    """
    k = x.shape[1]
    if k != y.shape[1] or k == 0:
        raise ValueError(f"bases of equal, positive width expected, got {k} and {y.shape[1]}")
    return float(np.square(x.T @ y).sum() / k)
