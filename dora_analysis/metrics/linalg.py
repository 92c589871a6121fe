"""Decompositions for the spectral metrics, on the CPU or a GPU, in float64.

Shared by :mod:`.spectrum` and :mod:`.intruders`; not a metric itself. Torch and scipy are
imported inside the functions (the command line lists the settings without loading them). What
each result is good for, and how that is checked, is in :mod:`.bounds`.

* :func:`gram_spectrum` — every eigenvalue of the Gram matrix XᵀX of the smaller side (σᵢ²) and
  its top eigenvectors: one ``syrk`` and one Householder tridiagonalisation (LAPACK ``dsytrd``,
  then ``dsterf`` for the values and ``stebz``/``stein`` plus the reflectors for the top
  vectors), about a sixth of a dense SVD with vectors; ``torch.linalg.eigh`` on a GPU.
* :func:`top_left_singular_vectors` — the top-k left singular vectors of a matrix given densely or
  as ``W0 + s·B·A``, with a bound on each one's angle: Lanczos (ARPACK) on the Gram matrix, for an
  adapter with products ``W0·x + s·B·(A·x)`` only; a dense eigendecomposition on a GPU.
* :func:`dense_svd` — thin SVD of a dense matrix on the chosen device (the fallback whenever a
  bound cannot certify a fast result, and the drill-down's spectra).
* :func:`low_rank_svd` — the exact thin SVD of ``s·B·A`` from an ``r × r`` core (QR of ``B`` and
  ``Aᵀ``, then an SVD of ``s·R_B·R_Aᵀ``): ``O((out + in)·r²)``, never forming ``B·A``.

BLAS and LAPACK run one thread per call (:func:`one_blas_thread`), as torch does in every
executor: the executors run one matrix per worker, and the bits do not depend on who ran it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Setting

if TYPE_CHECKING:
    import numpy as np
    import torch

DEVICES = ("cpu", "cuda")


def device_name(text: str) -> str:
    """Check of a ``--device`` value: ``cpu``, ``cuda`` or ``cuda:N`` (whether that GPU is
    there is asked by :func:`resolve_device`, on the machine that computes)."""
    kind, _, index = text.partition(":") if isinstance(text, str) else ("", "", "")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError("must be cpu, cuda or cuda:N")
    return text


DEVICE = Setting("device", "cpu", "where the SVDs of --spectrum, --intruders and --drift run: "
                 "cpu, cuda or cuda:N (a GPU; float64 there too)", type=str, check=device_name)


def resolve_device(text: str | torch.device) -> torch.device:
    """The torch device for ``text``; :class:`ConfigError` if it is not there."""
    import torch

    name = DEVICE.validate(str(text))  # a torch.device too
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def dense_svd(w: torch.Tensor, device: torch.device, *, vectors: bool = True
              ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Thin SVD ``w = U·diag(S)·Vᵀ`` in float64 on ``device``; results on the CPU.

    Returns ``(U, S, V)`` with ``V`` (not ``Vh``) so both factors hold vectors as columns;
    ``U`` and ``V`` are None when ``vectors`` is False (about half the cost).
    """
    import torch

    x = w.to(device=device, dtype=torch.float64)
    if not vectors:
        return None, torch.linalg.svdvals(x).cpu(), None
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u.cpu(), s.cpu(), vh.mT.cpu()


def low_rank_svd(b: torch.Tensor, a: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``ΔW = scale · B @ A`` (``B`` out × r, ``A`` r × in) without ``B @ A``.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), so ``ΔW = Q_B (scale R_B R_Aᵀ) Q_Aᵀ``;
    the SVD of that small core ``U_c Σ V_cᵀ`` gives ``U = Q_B U_c``, ``V = Q_A V_c``. Returns
    ``(U, S, V)`` in float64 with ``min(out, in, r)`` singular triplets.

    Example:
        >>> import torch
        >>> b, a = torch.randn(7, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
        >>> _, s, _ = low_rank_svd(b, a, 0.5)
        >>> torch.allclose(s, torch.linalg.svdvals(0.5 * b @ a)[:2])
        True
    """
    import torch

    qb, rb = torch.linalg.qr(b.to(torch.float64))  # (out, k1), (k1, r)
    qa, ra = torch.linalg.qr(a.to(torch.float64).T)  # (in, k2), (k2, r)
    uc, s, vch = torch.linalg.svd(scale * rb @ ra.T, full_matrices=False)  # core (k1, k2)
    return qb @ uc, s, qa @ vch.T



_BLAS = threading.Lock()
_BLAS_LIMIT: list = []  # [threadpoolctl limiter, number of callers inside]


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """NumPy's and SciPy's BLAS/LAPACK on one thread while any caller is inside (the limit is
    process-wide: it is set by the first caller in and lifted by the last one out).

    OpenBLAS honours a limit set from a thread other than the main one only until the main
    thread has set and lifted one itself: executors enter this in the thread that starts their
    workers (:func:`~dora_analysis.executors.blas_threads`), and the workers' own calls nest.
    """
    import scipy.linalg  # noqa: F401 - its own OpenBLAS must be loaded to be limited
    from threadpoolctl import threadpool_limits

    with _BLAS:
        if not _BLAS_LIMIT:
            _BLAS_LIMIT[:] = [threadpool_limits(1, user_api="blas"), 0]
        _BLAS_LIMIT[1] += 1
    try:
        yield
    finally:
        with _BLAS:
            _BLAS_LIMIT[1] -= 1
            if not _BLAS_LIMIT[1]:
                _BLAS_LIMIT.pop(0).restore_original_limits()
                _BLAS_LIMIT.clear()


@dataclass(frozen=True)
class GramSpectrum:
    """The eigen-decomposition of the Gram matrix of the smaller side of a matrix W."""

    transposed: bool
    """X = Wᵀ (W is wide): the vectors are W's left singular vectors; else X = W, its right."""
    eigenvalues: np.ndarray
    """λ̂ᵢ ≈ σᵢ², all of them, descending (float64)."""
    vectors: np.ndarray
    """The eigenvectors of the largest ``top`` eigenvalues, as columns, in the same order."""
    error: float
    """δ: |λ̂ᵢ − σᵢ²| ≤ δ for every i (see :mod:`.bounds`)."""
    frobenius_sq: float
    """‖W‖_F² as the trace of the Gram matrix (relative error ≤ c(max(shape)))."""


def tall(w: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(X, transposed)``: W itself when it has more rows than columns, else Wᵀ (so that a
    square W's Gram eigenvectors are its left singular vectors)."""
    return (w, False) if w.shape[0] > w.shape[1] else (w.T, True)


#: Below this size the Gram matrix is diagonalised by one LAPACK call (all vectors).
TRIDIAGONAL_MIN_SIZE = 64


def gram_spectrum(w: np.ndarray, top: int | None, device: torch.device) -> GramSpectrum:
    """All eigenvalues of the Gram matrix of W's smaller side, and the eigenvectors of its
    ``top`` largest (all of them when ``top`` is None), in float64.

    Example:
        >>> import numpy as np, torch
        >>> w = np.random.default_rng(0).standard_normal((50, 30))
        >>> g = gram_spectrum(w, 3, torch.device("cpu"))
        >>> bool(np.allclose(np.sqrt(g.eigenvalues), np.linalg.svd(w, compute_uv=False)))
        True
    """
    import numpy as np

    from .bounds import gram_error

    x, transposed = tall(np.asarray(w, dtype=np.float64))
    m, n = x.shape
    keep = n if top is None else min(top, n)
    if device.type == "cpu":
        with one_blas_thread():
            gram = x.T @ x  # (n, n); NumPy calls syrk for XᵀX: half the flops of a product
            trace = float(np.trace(gram))
            values, vectors = _gram_eigh_cpu(gram, keep)
    else:
        values, vectors, trace = _gram_eigh_torch(x, device)
    delta = gram_error(trace, m, n, float(values[0]) if n else 0.0)
    return GramSpectrum(transposed, values, vectors[:, :keep], delta, trace)


def _gram_eigh_cpu(gram: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and the top ``keep`` eigenvectors of a symmetric matrix."""
    import numpy as np
    import scipy.linalg as sl

    n = gram.shape[0]
    if keep == n or n < TRIDIAGONAL_MIN_SIZE:
        values, vectors = sl.eigh(gram, driver="evr", overwrite_a=True, check_finite=False)
        return values[::-1].copy(), vectors[:, ::-1][:, :keep].copy()
    q, diag, off = tridiagonalize(gram)
    values = np.sort(_sterf(diag, off))[::-1].copy()
    if keep == 0:
        return values, np.empty((n, 0))
    _, z = sl.eigh_tridiagonal(diag, off, select="i", select_range=(n - keep, n - 1),
                               check_finite=False)
    return values, q.apply(z[:, ::-1])  # (n, keep), descending, in G's coordinates


def _sterf(diag: np.ndarray, off: np.ndarray) -> np.ndarray:
    import numpy as np
    from scipy.linalg import lapack

    values, info = lapack.dsterf(diag.copy(), off.copy())
    if info != 0:
        raise np.linalg.LinAlgError(f"dsterf failed (info={info})")
    return values


@dataclass(frozen=True)
class Reflectors:
    """Q = H(1)·…·H(n−1) of a Householder tridiagonalisation QᵀGQ = T (LAPACK ``dsytrd``,
    UPLO = 'L'): H(i) = I − τᵢ·v·vᵀ with v = (0…0, 1, vᵢ), vᵢ stored below the subdiagonal of
    column i. Kept packed (the vᵢ one after the other), so applying Q to a few vectors costs
    O(n²·k) instead of forming it (2n³). No reflectors: Q = I."""

    packed: np.ndarray
    tau: np.ndarray

    @classmethod
    def from_lapack(cls, a: np.ndarray, tau: np.ndarray, dtype) -> Reflectors:
        import numpy as np

        n = a.shape[0]
        parts = [a[i + 2:, i] for i in range(n - 2)]
        packed = np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)
        return cls(packed, np.asarray(tau, dtype=dtype))

    def _each(self, reverse: bool) -> Iterator[tuple[int, float, np.ndarray]]:
        import numpy as np

        count = len(self.tau)  # n − 1
        n = count + 1
        lengths = np.maximum(n - np.arange(count) - 2, 0)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i in (range(count - 1, -1, -1) if reverse else range(count)):
            v = np.empty(n - i - 1)
            v[0] = 1.0
            v[1:] = self.packed[offsets[i]:offsets[i + 1]]
            yield i, float(self.tau[i]), v

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Q·x for x of shape (n, k), in float64 (a new array)."""
        import numpy as np

        x = np.array(x, dtype=np.float64, order="C")
        for i, tau, v in self._each(reverse=True):
            x[i + 1:] -= tau * np.outer(v, v @ x[i + 1:])
        return x

    def apply_t(self, x: np.ndarray) -> np.ndarray:
        """Qᵀ·x for x of shape (n, k), in float64 (a new array)."""
        import numpy as np

        x = np.array(x, dtype=np.float64, order="C")
        for i, tau, v in self._each(reverse=False):
            x[i + 1:] -= tau * np.outer(v, v @ x[i + 1:])
        return x


def tridiagonalize(gram: np.ndarray, dtype=None) -> tuple[Reflectors, np.ndarray, np.ndarray]:
    """``(Q, diagonal, off-diagonal)`` of QᵀGQ = T for a symmetric float64 ``gram`` (overwritten),
    Q's reflectors stored in ``dtype`` (default float64)."""
    import numpy as np
    from scipy.linalg import lapack

    n = gram.shape[0]
    lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
    a, diag, off, tau, info = lapack.dsytrd(gram, lower=1, lwork=lwork, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsytrd failed (info={info})")
    return Reflectors.from_lapack(a, tau, dtype or np.float64), diag, off


@dataclass(frozen=True)
class GramBasis:
    """Every eigenvector of the Gram matrix of W's smaller side, as Q·Z (see :class:`Reflectors`;
    Z the eigenvectors of the tridiagonal matrix), both stored in float32."""

    transposed: bool
    """The eigenvectors are W's left singular vectors (X = Wᵀ); else its right ones."""
    eigenvalues: np.ndarray
    """All of them, descending (float64)."""
    reflectors: Reflectors
    z: np.ndarray
    """(n, n) float32, columns in the order of the eigenvalues."""
    error: float
    """δ of :mod:`.bounds`: |λ̂ᵢ − σᵢ²| ≤ δ."""
    frobenius_sq: float


def gram_basis(w: np.ndarray, device: torch.device) -> GramBasis:
    """All eigenvalues and eigenvectors of the Gram matrix of W's smaller side in factored form:
    one ``syrk``, one tridiagonalisation and the eigenvectors of the tridiagonal matrix (MRRR,
    O(n²)), never the 2n³ back-transformation (a GPU computes them whole: Q = I)."""
    import numpy as np
    import scipy.linalg as sl

    from .bounds import gram_error

    x, transposed = tall(np.asarray(w, dtype=np.float64))
    m, n = x.shape
    if device.type != "cpu" or n < TRIDIAGONAL_MIN_SIZE:
        g = gram_spectrum(w, None, device)
        empty = Reflectors(np.empty(0, np.float32), np.empty(0, np.float32))
        return GramBasis(transposed, g.eigenvalues, empty, g.vectors.astype(np.float32),
                         g.error, g.frobenius_sq)
    with one_blas_thread():
        gram = x.T @ x
        trace = float(np.trace(gram))
        q, diag, off = tridiagonalize(gram, np.float32)
        del gram
        values, z = sl.eigh_tridiagonal(diag, off, lapack_driver="stemr", check_finite=False)
    values, z = values[::-1].copy(), np.ascontiguousarray(z[:, ::-1], dtype=np.float32)
    return GramBasis(transposed, values, q, z, gram_error(trace, m, n, float(values[0])), trace)


def _gram_eigh_torch(x: np.ndarray, device: torch.device
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`_gram_eigh_cpu` with every vector, on a GPU (cuSOLVER ``syevd``), and the trace."""
    import torch

    xt = torch.from_numpy(x).to(device=device, dtype=torch.float64)
    gram = xt.T @ xt
    values, vectors = torch.linalg.eigh(gram)
    return (values.flip(0).cpu().numpy(), vectors.flip(1).cpu().numpy(),
            float(torch.trace(gram)))


@dataclass(frozen=True)
class TopVectors:
    """Top-k left singular vectors with a bound on each one's angle to the exact vector."""

    vectors: np.ndarray
    """(out, k), by decreasing singular value."""
    angles: np.ndarray
    """(k,): sin of the angle to the exact singular vector is at most this (inf: unknown,
    e.g. two equal singular values, whose vectors no method determines)."""


#: Below this many columns/rows a full eigendecomposition is as cheap as Lanczos.
LANCZOS_MIN_SIZE = 64
#: ARPACK's relative accuracy of the Ritz values: residuals of ~1e-10·σ₁² give angles far
#: inside the intruder test's margins, in a quarter fewer iterations than full precision.
LANCZOS_TOL = 1e-10


def top_left_singular_vectors(w: np.ndarray | None, k: int, device: torch.device, *,
                              base: np.ndarray | None = None,
                              update: tuple[np.ndarray, np.ndarray, float] | None = None
                              ) -> TopVectors:
    """The top-``k`` left singular vectors (columns, by decreasing singular value) of ``w``,
    or of ``base + s·B·A`` given as ``update=(B, A, s)``, each with an angle bound.

    On the CPU, ARPACK's Lanczos iteration runs on the Gram matrix of the smaller side (formed
    once for a dense matrix; for an adapter applied as products ``W0·x + s·B·(A·x)`` only, never
    ``B·A``), for k + 1 eigenpairs: the residual of each Ritz pair and the gap to its neighbours
    bound its angle (Davis–Kahan; the Gram matrix's own rounding added). Small matrices (fewer
    than :data:`LANCZOS_MIN_SIZE` rows or columns, or ``k`` close to that) and GPUs take the
    whole eigendecomposition. The start vector is fixed: repeatable results.
    """
    import numpy as np

    if w is None:
        b, a, s = update
        rows, cols = base.shape
        norm = math.sqrt(float(np.einsum("ij,ij->", base, base))) + abs(s) * float(
            np.linalg.norm(b)) * float(np.linalg.norm(a))
        frobenius_sq = norm * norm  # an upper bound of ‖W‖_F² (for the rounding bound)
    else:
        rows, cols = w.shape
        frobenius_sq = float(np.einsum("ij,ij->", w, w))
    k = min(k, rows, cols)
    small = min(rows, cols) < max(LANCZOS_MIN_SIZE, k + 3)
    if device.type != "cpu" or small:
        merged = w if w is not None else base + update[2] * (update[0] @ update[1])
        spectrum = gram_spectrum(merged, None, device)
        values = spectrum.eigenvalues
        residuals = np.full(len(values), spectrum.error)  # the solver's backward error
        vectors, transposed = spectrum.vectors, spectrum.transposed
        delta, every = 0.0, True  # the solver's error is in the residuals
    else:
        values, vectors, residuals, transposed, delta = _lanczos_gram(w, k, base, update,
                                                                     frobenius_sq)
        every = False
    return _left_vectors(w, base, update, values, vectors, residuals + delta, transposed, k,
                         every)


def _lanczos_gram(w, k, base, update, frobenius_sq):
    """Ritz pairs of the Gram matrix of the smaller side by ARPACK: values (descending),
    vectors, residual norms (computed), transposed, and δ (the Gram matrix's rounding)."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    from .bounds import gram_error, rounding

    rows, cols = (w if w is not None else base).shape
    transposed = rows <= cols  # the Gram matrix of the smaller side: W·Wᵀ (left vectors)
    n = min(rows, cols)
    with one_blas_thread():
        if w is not None:
            x = w.T if transposed else w
            op = x.T @ x
        else:
            b, a, s = update

            def times(v):  # W·v = W0·v + s·B·(A·v)
                return base @ v + s * (b @ (a @ v))

            def times_t(y):  # Wᵀ·y
                return base.T @ y + s * (a.T @ (b.T @ y))

            gram = (lambda y: times(times_t(y))) if transposed else (lambda v: times_t(times(v)))
            op = LinearOperator((n, n), dtype=np.float64, matvec=gram, matmat=gram)
        nev = min(k + 1, n - 1)
        start = np.random.default_rng(0).standard_normal(n)
        values, vectors = eigsh(op, k=nev, v0=start, ncv=min(n, max(2 * nev + 1, 40)),
                                tol=LANCZOS_TOL)
        order = np.argsort(values)[::-1]
        values, vectors = values[order], np.ascontiguousarray(vectors[:, order])
        residuals = np.linalg.norm(op @ vectors - vectors * values, axis=0)
    # δ: the Gram matrix's rounding (twice for products through the factors) and the rounding
    # of the residuals themselves.
    delta = (gram_error(frobenius_sq, max(rows, cols), n, float(values[0])) * (
        1 if w is not None else 2) + rounding(n) * frobenius_sq)
    return values, vectors, residuals, transposed, delta


def _left_vectors(w, base, update, values, vectors, r, transposed, k, every):
    """Left singular vectors and their angle bounds from Gram eigenpairs with residual norms
    ``r`` (for the exact Gram matrix); ``every``: the values are the whole spectrum, else the
    top ones found by Lanczos (assumed not to have missed one between them)."""
    import numpy as np

    from .bounds import rounding

    # Davis–Kahan for one vector: sin ≤ r / (distance from its value to every other eigenvalue,
    # which lies within its own residual of a neighbouring value or below the last one).
    above = np.concatenate([[np.inf], values[:-1] - r[:-1]]) - values
    below = values - np.concatenate([values[1:] + r[1:], [-np.inf if every else np.nan]])
    gap = np.minimum(above, below)[:k]  # Lanczos: the extra last value bounds the k-th's gap
    with np.errstate(divide="ignore", invalid="ignore"):
        angles = np.where(gap > r[:k], r[:k] / gap, np.inf)
    if transposed:
        return TopVectors(np.ascontiguousarray(vectors[:, :k]), angles)
    # Right vectors v of a tall W: y = W·v/‖W·v‖, its angle ≤ (σ₁/σⱼ)·tan(angle of v), with
    # σⱼ ≥ ‖W·v‖ − σ₁·sin(angle of v).
    if w is not None:
        y = w @ vectors[:, :k]
    else:
        b, a, s = update
        y = base @ vectors[:, :k] + s * (b @ (a @ vectors[:, :k]))
    sigma = np.linalg.norm(y, axis=0)
    y = y / np.where(sigma > 0, sigma, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tangent = angles / np.sqrt(np.maximum(1 - angles**2, 0.0))
        product = rounding(vectors.shape[0]) * math.sqrt(max(values[0], 0.0)) * math.sqrt(
            vectors.shape[0])  # rounding of W·v, relative to ‖W·v‖ below
        top = math.sqrt(max(values[0], 0.0))
        floor = sigma - top * angles
        angles = np.where(np.isfinite(tangent) & (floor > 0), (top * tangent + product) / floor,
                          np.inf)
    return TopVectors(np.ascontiguousarray(y), angles)
