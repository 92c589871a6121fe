"""Intruder dimensions (``--intruders``): new high-ranking singular directions that fine-tuning put
into a weight matrix (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228, NeurIPS 2025).

With W0 = U0 S0 V0ᵀ and Wt = Ut St Vtᵀ (output channels as rows, so U holds output-space
directions), each of the top ``k`` left singular vectors ``yⱼ`` of Wt is compared with every left
singular vector of W0; ``yⱼ`` is an intruder when ``maxᵢ |⟨yⱼ, u0ᵢ⟩| < ε``. The column
``intruders`` counts them (defaults k = 10, ε = 0.5, as the paper and PEFT's
``tuners/lora/intruders.py``).

Cost: one full SVD of W0 per base matrix — cached on disk, so a training series or several
adapters of one base pay it once — plus the top k of Wt: Lanczos on the CPU (for an adapter with
products ``W0·x + s·B·(A·x)`` only, never ``B·A``), a dense SVD on a GPU (``--device cuda``).

The cache (``--svd-cache``, default ``$XDG_CACHE_HOME/dora-analysis`` or
``~/.cache/dora-analysis``; ``none`` turns it off) holds U0 in float32 under a SHA-256 of the
matrix's float64 content, its shape and the tensor name: a changed or different file can never
serve a stale SVD, and a copy of the same base reuses it. U0 is rounded to float32 on a miss as
well, so the first and later checkpoints of a series see the same numbers. A cache folder that
cannot be written is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..cache.location import cache_root
from .base import Column, Metric, Setting, fraction, optional_folder, positive_int
from .linalg import DEVICE

if TYPE_CHECKING:
    import torch

    from ..pairs import PairView

INTRUDERS = "intruders"
#: Bumped when what is cached (or how it is computed) changes: old entries are then ignored.
CACHE_VERSION = "u0-float32-v1"

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


def content_key(w0: torch.Tensor, name: str) -> str:
    """SHA-256 of a matrix's float64 content, its shape and name (the cache key)."""
    import numpy as np

    digest = hashlib.sha256(f"{CACHE_VERSION}|{name}|{tuple(w0.shape)}|".encode())
    digest.update(memoryview(np.ascontiguousarray(w0.detach().cpu().double().numpy())))
    return digest.hexdigest()


def base_left_singular_vectors(w0: torch.Tensor, name: str, device: torch.device,
                               cache: Path | None) -> torch.Tensor:
    """All left singular vectors of W0 (out × min(out, in), float32 values in float64), from the
    cache when it has them, else by a dense SVD that is then cached."""
    import numpy as np
    import torch

    from .linalg import dense_svd

    path = None
    if cache is not None:
        path = cache / "base-svd" / f"{content_key(w0, name)}.npy"
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path)).to(torch.float64)
            except (OSError, ValueError):
                pass  # a damaged entry: recompute and overwrite it
    u0, _, _ = dense_svd(w0, device)
    u0 = u0.to(torch.float32)
    if path is not None:
        _save_atomically(path, u0.numpy())
    return u0.to(torch.float64)


def _save_atomically(path: Path, array) -> None:
    import numpy as np

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array)
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


def tuned_top_vectors(view: PairView, k: int, device: torch.device) -> torch.Tensor | None:
    """The top-k left singular vectors of Wt (None if it holds NaN/Inf)."""
    import torch

    from .linalg import top_left_singular_vectors

    lora = view.low_rank()
    if lora is not None:  # Wt = W0 + s·B·A: Lanczos on products, no merge
        a, b = lora.factors()
        w0 = view.base_weight()
        if not all(bool(torch.isfinite(x).all()) for x in (a, b, w0)):
            return None
        return top_left_singular_vectors(None, k, device, base=w0, update=(b, a, lora.scale))
    _, wt = view.weights()
    if not bool(torch.isfinite(wt).all()):
        return None
    return top_left_singular_vectors(wt, k, device)


def intruder_cosines(view: PairView, k: int, device: torch.device, cache: Path | None
                     ) -> torch.Tensor | None:
    """For each of the top-k left singular vectors of Wt, its best ``|cos|`` with W0's (None
    when either weight holds NaN/Inf)."""
    import torch

    w0 = view.base_weight()
    if not bool(torch.isfinite(w0).all()):
        return None
    top = tuned_top_vectors(view, k, device)
    if top is None:
        return None
    return max_cosines(top, base_left_singular_vectors(w0, view.pair.name, device, cache))


def intruders(view: PairView) -> dict[str, float | int]:
    """The ``intruders`` column of one matrix pair (NaN for non-finite weights)."""
    from .linalg import resolve_device

    k, eps = view.config.setting("intruder_k"), view.config.setting("intruder_eps")
    cosines = intruder_cosines(view, k, resolve_device(view.config.setting("device")),
                               cache_dir(view.config.setting("svd_cache")))
    return {INTRUDERS: math.nan if cosines is None else int((cosines < eps).sum())}


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
