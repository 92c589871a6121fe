"""Singular value decompositions for the spectral metrics, on the CPU or a GPU, in float64.

Shared by :mod:`.spectrum` and :mod:`.intruders`; not a metric itself. Torch and scipy are
imported inside the functions (the command line lists the settings without loading them).

* :func:`dense_svd` — thin SVD of a dense matrix on the chosen device.
* :func:`low_rank_svd` — the exact thin SVD of ``s·B·A`` from an ``r × r`` core (QR of ``B`` and
  ``Aᵀ``, then an SVD of ``s·R_B·R_Aᵀ``): ``O((out + in)·r²)``, never forming ``B·A``.
* :func:`top_left_singular_vectors` — the top-k left singular vectors of a matrix given densely or
  as ``W0 + s·B·A`` (Lanczos on the CPU, with matrix-vector products only; a dense SVD on a GPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Setting

if TYPE_CHECKING:
    import torch

DEVICES = ("cpu", "cuda")


def device_name(text: str) -> str:
    """Check of a ``--device`` value: ``cpu``, ``cuda`` or ``cuda:N`` (whether that GPU is
    there is asked by :func:`resolve_device`, on the machine that computes)."""
    kind, _, index = text.partition(":") if isinstance(text, str) else ("", "", "")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError("must be cpu, cuda or cuda:N")
    return text


DEVICE = Setting("device", "cpu", "where the SVDs of --spectrum and --intruders run: cpu, cuda "
                 "or cuda:N (a GPU; float64 there too)", type=str, check=device_name)


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


#: Below this many columns/rows a full SVD is as cheap as Lanczos and always exact.
LANCZOS_MIN_SIZE = 64


def top_left_singular_vectors(w: torch.Tensor | None, k: int, device: torch.device, *,
                              base: torch.Tensor | None = None,
                              update: tuple[torch.Tensor, torch.Tensor, float] | None = None
                              ) -> torch.Tensor:
    """The top-``k`` left singular vectors (columns, by decreasing singular value), float64.

    The matrix is ``w`` (dense) or, for an adapter, ``base + s·B·A`` given as ``update=(B, A,
    s)``: on the CPU, ARPACK's Lanczos iteration (scipy ``svds``) uses only products
    ``W0·x + s·B·(A·x)``, so ``B·A`` is never formed; on a GPU the merged matrix is decomposed
    densely. Small matrices (fewer than :data:`LANCZOS_MIN_SIZE` rows or columns, or
    ``k`` close to that) take a dense SVD. The starting vector is fixed: repeatable results.
    """
    import numpy as np
    import torch

    def merged() -> torch.Tensor:
        if w is not None:
            return w
        b, a, s = update
        return base.to(device=device, dtype=torch.float64) + s * (
            b.to(device=device, dtype=torch.float64) @ a.to(device=device, dtype=torch.float64))

    rows, cols = (w.shape if w is not None else base.shape)
    k = min(k, rows, cols)
    if device.type != "cpu" or min(rows, cols) < max(LANCZOS_MIN_SIZE, k + 2):
        u, _, _ = dense_svd(merged(), device)
        return u[:, :k]
    from scipy.sparse.linalg import LinearOperator, svds

    if w is not None:
        op = w.numpy()
    else:
        b, a, s = (x.to(torch.float64).numpy() if hasattr(x, "numpy") else x for x in update)
        w0 = base.numpy()
        op = LinearOperator((rows, cols), dtype=np.float64,
                            matvec=lambda x: w0 @ x + s * (b @ (a @ x)),
                            rmatvec=lambda y: w0.T @ y + s * (a.T @ (b.T @ y)))
    start = np.random.default_rng(0).standard_normal(min(rows, cols))
    u, sigma, _ = svds(op, k=k, v0=start, solver="arpack")
    order = np.argsort(sigma)[::-1]
    return torch.from_numpy(np.ascontiguousarray(u[:, order]))
