"""Intruder dimensions (``--intruders``): new high-ranking singular directions that fine-tuning put
into a weight matrix (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228, NeurIPS 2025).

With W0 = U0 S0 V0ᵀ and Wt = Ut St Vtᵀ (output channels as rows, so U holds output-space
directions), each of the top ``k`` left singular vectors ``yⱼ`` of Wt is compared with every left
singular vector of W0; ``yⱼ`` is an intruder when ``maxᵢ |⟨yⱼ, u0ᵢ⟩| < ε``. The column
``intruders`` counts them (defaults k = 10, ε = 0.5, as the paper and PEFT's
``tuners/lora/intruders.py``).

How, and what it costs:

* W0's left basis: the eigenvectors of the float64 Gram matrix of its smaller side (one
  ``syrk`` and one symmetric eigendecomposition, ~2-3× cheaper than a dense SVD with vectors;
  for a tall W0 the left vectors are W0·V0·Σ0⁻¹), grouped into clusters of close eigenvalues with
  a Davis–Kahan angle bound each, stored in float32 — cached on disk, so a training series or
  several adapters of one base pay it once.
* Wt's top k: Lanczos (ARPACK) on its Gram matrix for k + 1 eigenpairs, each vector with an angle
  bound from its residual and gap; for an adapter with products ``W0·x + s·B·(A·x)`` only, never
  ``B·A``. A GPU (``--device cuda``) takes whole eigendecompositions instead.
* Each tested vector is decided only when the bounds put every possible exact cosine on one side
  of ε (:func:`~.bounds.intruder_status`; :mod:`.bounds` has the analysis, including why a
  float32 basis is enough); if any is not, the matrix is counted from dense float64 SVDs of
  W0 and Wt instead — the reference's own method.

The cache (``--svd-cache``, default ``$XDG_CACHE_HOME/dora-analysis`` or
``~/.cache/dora-analysis``; ``none`` turns it off) holds the basis under a SHA-256 of the
matrix's float64 content, its shape and the tensor name: a changed or different file can never
serve a stale basis, and a copy of the same base reuses it. The basis is rounded to float32 on
a miss as well, so the first and later checkpoints of a series see the same numbers. A cache
folder that cannot be written is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..cache.location import cache_root
from .base import Column, Metric, Setting, fraction, optional_folder, positive_int
from .linalg import DEVICE

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..pairs import PairView
    from .linalg import TopVectors

INTRUDERS = "intruders"
#: Bumped when what is cached (or how it is computed) changes: old entries are then ignored.
CACHE_VERSION = "basis-gram-float32-v2"

INTRUDER_K = Setting("intruder_k", 10, "--intruders: how many top singular vectors of the tuned "
                     "matrix are tested", type=int, check=positive_int)
INTRUDER_EPS = Setting("intruder_eps", 0.5, "--intruders: a top vector whose best |cos| with "
                       "every base singular vector is below this is an intruder", check=fraction)
SVD_CACHE = Setting("svd_cache", None, "folder for cached SVDs of base matrices (--intruders); "
                    "by default $XDG_CACHE_HOME/dora-analysis or ~/.cache/dora-analysis; 'none': "
                    "no cache", type=str, check=optional_folder)


def cache_dir(setting: str | os.PathLike | None) -> Path | None:
    """The SVD cache folder a setting names: the default location when empty, None for 'none'."""
    text = "" if setting is None else str(setting)
    if text.lower() == "none":
        return None
    if text:
        return Path(text).expanduser()
    return cache_root()


def content_key(w0: np.ndarray | torch.Tensor, name: str) -> str:
    """SHA-256 of a matrix's float64 content, its shape and name (the cache key)."""
    import numpy as np

    data = np.ascontiguousarray(np.asarray(w0, dtype=np.float64))
    digest = hashlib.sha256(f"{CACHE_VERSION}|{name}|{tuple(data.shape)}|".encode())
    digest.update(memoryview(data))
    return digest.hexdigest()


@dataclass(frozen=True)
class Basis:
    """W0's left singular vectors as Q·Z from its Gram matrix (see
    :func:`~.linalg.gram_basis`), grouped into clusters of close singular values."""

    reflectors: np.ndarray
    """Q's Householder vectors, packed (float32; empty: Q = I)."""
    tau: np.ndarray
    z: np.ndarray
    """(p, p) float32: Z, columns by decreasing singular value."""
    sigma: np.ndarray
    """σ̂ of each column (float64)."""
    tall: bool
    """Q·Z are W0's right singular vectors V (W0 has more rows than columns): the left ones
    are W0·vᵢ/σᵢ, and testing needs W0."""
    starts: np.ndarray
    """First column of each cluster."""
    margins: np.ndarray
    """Per cluster: the angle bound to the exact subspace plus every rounding (:mod:`.bounds`)."""

    FIELDS = ("reflectors", "tau", "z", "sigma", "tall", "starts", "margins")

    def coefficients(self, y: np.ndarray, w0: np.ndarray) -> np.ndarray:
        """⟨ûᵢ, yⱼ⟩ for every basis vector ûᵢ and column yⱼ of ``y``: shape (p, k)."""
        import numpy as np

        from .linalg import Reflectors, one_blas_thread

        with one_blas_thread():
            x = w0.T @ y if self.tall else y
            x = Reflectors(self.reflectors, self.tau).apply_t(x)
            c = (self.z.T @ x.astype(np.float32)).astype(np.float64)
        if self.tall:
            c = np.divide(c, self.sigma[:, None], out=np.zeros_like(c),
                          where=self.sigma[:, None] > 0)
        return c

    def save(self, path: Path) -> None:
        import numpy as np

        _save_atomically(path, lambda f: np.savez(f, **{k: getattr(self, k)
                                                          for k in self.FIELDS}))

    @classmethod
    def load(cls, path: Path) -> Basis | None:
        """The basis stored at ``path``, or None when it is missing or damaged."""
        import zipfile

        import numpy as np

        try:  # never unpickles: allow_pickle stays False
            with np.load(path) as data:
                basis = cls(**{k: data[k] for k in cls.FIELDS})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        p = len(basis.sigma)
        ok = (basis.z.shape == (p, p) and len(basis.starts) == len(basis.margins) > 0
              and basis.starts[0] == 0 and len(basis.tau) in (0, p - 1)
              and len(basis.reflectors) == (max(p - 1, 0) * max(p - 2, 0) // 2
                                            if len(basis.tau) else 0))
        return basis if ok else None


def compute_basis(w0: np.ndarray, device: torch.device) -> Basis:
    """W0's left basis from its Gram matrix, with cluster margins (see :mod:`.bounds`, §2)."""
    import numpy as np

    from .bounds import U32, clusters, rounding, sigma_intervals
    from .linalg import gram_basis

    g = gram_basis(w0, device)
    n = len(g.eigenvalues)
    groups = clusters(g.eigenvalues, g.error)
    sizes = groups.sizes(n)
    # float32 storage: each column of Z, and the product Zᵀ·x in float32; the float32
    # reflectors move Q by ≤ 6·u₃₂ each (τ‖v‖² = 2), ≤ 6(n−1)·u₃₂·(1 + 6u₃₂)ⁿ in all.
    storage = (U32 + rounding(n, U32)) * np.sqrt(sizes)
    if len(g.reflectors.tau):
        storage = storage + 6 * (n - 1) * U32 * (1 + 6 * U32) ** n
    sigma = np.sqrt(np.maximum(g.eigenvalues, 0.0))
    tall = not g.transposed
    if not tall:
        margins = groups.angles + storage
    else:  # left vectors W0·v/σ: angles and roundings grow by σ₁/σ_min(C) (§2)
        lo, hi = sigma_intervals(g.eigenvalues, g.error)
        ends = np.append(groups.starts[1:], n)
        smallest, lam_min = lo[ends - 1], g.eigenvalues[ends - 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            tangent = groups.angles / np.sqrt(np.maximum(1 - groups.angles**2, 0.0))
            scale = hi[0] / smallest
            product = rounding(w0.shape[0]) * math.sqrt(g.frobenius_sq) / smallest
            skew = g.error / (lam_min - g.error)  # W0·V̂_C·Σ̂⁻¹ is orthonormal only to this
            margins = scale * (tangent + storage) + product + skew
        margins = np.where((smallest > 0) & (lam_min > g.error) & np.isfinite(margins),
                           margins, np.inf)
    return Basis(g.reflectors.packed, g.reflectors.tau, g.z, sigma, tall, groups.starts,
                 np.asarray(margins, dtype=np.float64))


def base_basis(w0: np.ndarray, name: str, device: torch.device, cache: Path | None) -> Basis:
    """W0's left basis, from the cache when it has it, else computed (and then cached)."""
    path = None
    if cache is not None:
        path = cache / "base-svd" / f"{content_key(w0, name)}.npz"
        if path.is_file():
            basis = Basis.load(path)
            if basis is not None and len(basis.sigma) == min(w0.shape):
                return basis  # a damaged entry is recomputed and overwritten
    basis = compute_basis(w0, device)
    if path is not None:
        basis.save(path)
    return basis


def _save_atomically(path: Path, write) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"cannot write the SVD cache in {path.parent} ({exc.strerror or exc}); "
                      "continuing without it (--svd-cache DIR chooses another folder)",
                      RuntimeWarning, stacklevel=3)


def max_cosines(u_tuned: torch.Tensor, u_base: torch.Tensor) -> torch.Tensor:
    """For each column ``y`` of ``u_tuned``: ``max_i |⟨y, u_base[:, i]⟩|`` (unit columns)."""
    return (u_tuned.T @ u_base).abs().amax(dim=1)  # (k, n_base) → (k,)


def intruder_count(u_tuned: torch.Tensor, u_base: torch.Tensor, eps: float) -> int:
    """How many of the columns of ``u_tuned`` have no base direction with ``|cos| ≥ eps``.

    Example:
        >>> import torch
        >>> eye = torch.eye(3, dtype=torch.float64)
        >>> tilted = torch.tensor([[0.6], [0.0], [0.8]], dtype=torch.float64)
        >>> intruder_count(tilted, eye[:, :1], 0.5), intruder_count(tilted, eye, 0.5)
        (0, 0)
        >>> intruder_count(eye[:, 2:], eye[:, :2], 0.5)
        1
    """
    return int((max_cosines(u_tuned, u_base) < eps).sum())


def tuned_top_vectors(view: PairView, k: int, device: torch.device) -> TopVectors | None:
    """The top-k left singular vectors of Wt with their angle bounds (None if Wt holds
    NaN/Inf)."""
    import torch

    from .linalg import top_left_singular_vectors

    lora = view.low_rank()
    if lora is not None:  # Wt = W0 + s·B·A: Lanczos on products, no merge
        a, b = lora.factors()
        w0 = view.base_weight()
        if not all(bool(torch.isfinite(x).all()) for x in (a, b, w0)):
            return None
        return top_left_singular_vectors(None, k, device, base=w0.numpy(), update=(
            b.to(torch.float64).numpy(), a.to(torch.float64).numpy(), lora.scale))
    _, wt = view.weights()
    if not bool(torch.isfinite(wt).all()):
        return None
    return top_left_singular_vectors(wt.numpy(), k, device)


@dataclass(frozen=True)
class IntruderTest:
    """The top-k vectors of Wt against W0's basis."""

    cosines: np.ndarray
    """Best |cos| of each tested vector with W0's basis, as computed."""
    status: np.ndarray
    """1: certainly an intruder, 0: certainly not, −1: the bounds cannot tell."""


def intruder_test(view: PairView, k: int, eps: float, device: torch.device, cache: Path | None
                  ) -> IntruderTest | None:
    """Test the top-k left singular vectors of Wt against W0's (None when either weight holds
    NaN/Inf)."""
    import numpy as np
    import torch

    from .bounds import Clusters, intruder_status

    w0 = view.base_weight()
    if not bool(torch.isfinite(w0).all()):
        return None
    top = tuned_top_vectors(view, k, device)
    if top is None:
        return None
    basis = base_basis(w0.numpy(), view.pair.name, device, cache)
    coefficients = basis.coefficients(top.vectors, w0.numpy())  # (n_base, k)
    margin = basis.margins[:, None] + np.sqrt(2) * top.angles[None, :]
    status = intruder_status(coefficients, Clusters(basis.starts, basis.margins), margin, eps)
    return IntruderTest(np.abs(coefficients).max(axis=0), status)


def intruder_cosines(view: PairView, k: int, device: torch.device, cache: Path | None
                     ) -> torch.Tensor | None:
    """For each of the top-k left singular vectors of Wt, its best ``|cos|`` with W0's (None
    when either weight holds NaN/Inf)."""
    import torch

    test = intruder_test(view, k, 0.5, device, cache)
    return None if test is None else torch.from_numpy(test.cosines)


def dense_count(view: PairView, k: int, eps: float, device: torch.device) -> int:
    """The count from dense float64 SVDs of W0 and Wt (the reference method), for the matrices
    whose fast test the bounds cannot decide."""
    from .linalg import dense_svd

    w0, wt = view.weights()
    u0, _, _ = dense_svd(w0, device)
    ut, _, _ = dense_svd(wt, device)
    return intruder_count(ut[:, :k], u0, eps)


def intruders(view: PairView) -> dict[str, float | int]:
    """The ``intruders`` column of one matrix pair (NaN for non-finite weights)."""
    from .linalg import resolve_device

    k, eps = view.config.setting("intruder_k"), float(view.config.setting("intruder_eps"))
    device = resolve_device(view.config.setting("device"))
    test = intruder_test(view, k, eps, device, cache_dir(view.config.setting("svd_cache")))
    if test is None:
        return {INTRUDERS: math.nan}
    if (test.status < 0).any():
        return {INTRUDERS: dense_count(view, k, eps, device)}
    return {INTRUDERS: int(test.status.sum())}


METRIC = Metric(
    name="intruders",
    description="intruder dimensions: top-k singular vectors of Wt far from every singular "
                "vector of W0 (Shuttleworth et al. 2024)",
    columns=(Column(INTRUDERS, "Int64", "top-k left singular vectors of Wt whose best |cos| "
                    "with W0's is below ε"),),
    compute=intruders,
    option="intruders",
    per_axis=False,
    cost="svd",
    settings=(INTRUDER_K, INTRUDER_EPS, SVD_CACHE, DEVICE),
)
