"""The maths of a low-rank update ``ΔW = s · B @ A`` (PEFT orientation) on a base weight: the merged
rows (Eq. 1, then DoRA's Eq. 5 normalisation) and the closed form of the per-channel sums that
needs no ``B @ A`` at all.

Closed form (axis ``out``; ``u_n = W0[n]``, ``d_n = s · B[n] @ A``)::

    |d_n|²    = s² · rowsum((B @ (A Aᵀ)) ⊙ B)[n]
    u_n · d_n = s  · rowsum((W0 Aᵀ) ⊙ B)[n]
    LoRA:  |wt|² = |u|² + 2 u·d + |d|²,   |wt − u|² = |d|²
    DoRA:  |wt|² = m²,  |wt − u|² = m² − 2 m (|u|² + u·d) / |u + d| + |u|²

so one read of each base tensor (``W0 Aᵀ``, accumulated block by block) gives Eqs. 3-4 exactly,
in float64, at the cost of an (out × r) product instead of an (out × in) one.

The functions take the factors as the adapter readers hand them out (an object with ``lora_a``,
``lora_b``, ``scale``, ``magnitude``, ``magnitude_axis``, ``token_rows``, ``rank`` and
``factors()``: :class:`dora_analysis.io.factors.LowRankUpdate`) and the base's rows as a function;
they read no files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import CheckpointFormatError
from .hardware import DEFAULT_BLOCK_ELEMENTS

F64 = torch.float64
#: Rows ``start:stop`` of the base weight as float64, 2-D ``(rows, in · prod(k))``.
RowReader = Callable[[int, int], torch.Tensor]
#: Per-output-channel ``(|w0|², |wt|², |wt − w0|²)``, float64 arrays.
ChannelSums = tuple[np.ndarray, np.ndarray, np.ndarray]


def rows_per_block(cols: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """Rows of ``cols`` elements that fit one block."""
    return max(1, block_elements // max(1, cols))


def merged_rows(
    update: Any, rows: torch.Tensor, start: int, stop: int, transposed: bool,
    column_factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stored rows ``start:stop`` of the merged weight (Eq. 1, then Eq. 5's normalisation).

    ``rows`` are the base's stored rows in float64 (2-D). ``column_factor`` is ``m / ||column||``
    when DoRA normalises along the stored columns (see
    :meth:`dora_analysis.merged.AdapterSource.column_factor`).
    """
    if update.lora_a is not None:
        if transposed:  # stored (in, out): rows are input features
            a_rows = update.lora_a[:, start:stop].to(F64)
            rows = rows + update.scale * (a_rows.T @ update.lora_b.to(F64).T)
        else:
            b_rows = update.lora_b[start:stop].to(F64)
            rows = rows + update.scale * (b_rows @ update.lora_a.to(F64))
    if update.magnitude is not None:
        if magnitude_on_stored_rows(update, transposed):
            norms = torch.linalg.vector_norm(rows, dim=1)
            rows = rows * safe_ratio(update.magnitude[start:stop], norms)[:, None]
        else:
            rows = rows * column_factor[None, :]
    if update.token_rows is not None:  # trainable tokens: stored rows replaced (index_copy)
        ids, values = update.token_rows
        inside = (ids >= start) & (ids < stop)
        if bool(inside.any()):
            rows = rows.clone()
            rows[ids[inside] - start] = values[inside].to(F64).reshape(int(inside.sum()), -1)
    return rows


def kasa_update(update: Any, w0: torch.Tensor) -> Any:
    """KaSA's update as one low-rank update of the untouched base ``w0`` (out, in), float64.

    PEFT's ``KasaLinearVariant`` replaces the base by its SVD truncated to ``k − d`` components
    (``k = min(out, in)``, ``d`` = :attr:`~LowRankUpdate.truncate_base`), then adds
    ``s · B @ diag(lora_diag) @ A``; so ``W' − W0 = s · [B·diag | −U_d S_d / s] @ [A ; V_dᵀ]``, a
    rank ``r + d`` update (the diagonal is already in ``lora_b``).
    """
    k, d = min(w0.shape), update.truncate_base
    if d >= k:
        raise CheckpointFormatError(f"KaSA needs r = {d} below min(out, in) = {k}: the adapter "
                                    "does not fit this base")
    u, sv, vh = torch.linalg.svd(w0, full_matrices=False)  # (out, k), (k,), (k, in)
    a = torch.cat([update.lora_a.to(F64), vh[k - d:]])  # (r + d, in)
    b = torch.cat([update.lora_b.to(F64), -(u[:, k - d:] * sv[k - d:]) / update.scale], dim=1)
    return dataclasses.replace(update, lora_a=a, lora_b=b, truncate_base=0)


def magnitude_on_stored_rows(update: Any, transposed: bool) -> bool:
    """Whether DoRA's magnitude scales the stored rows (else the stored columns)."""
    return (update.magnitude_axis == "out") != transposed


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den`` is 0."""
    # A zero-norm vector has no direction to rescale; PEFT would produce NaN, we keep it at zero.
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def closed_form_sums(
    update: Any, base_rows: RowReader, shape: tuple[int, int], transposed: bool,
    block_elements: int,
) -> ChannelSums:
    """Per-output-channel ``|w0|², |wt|², |wt − w0|²`` of the merged weight, without B @ A
    (float64 numpy arrays); ``shape``: the stored weight's ``(rows, cols)``."""
    rows, cols = shape
    out = cols if transposed else rows
    r, s = update.rank, update.scale
    a, b = update.factors() if r else (None, None)
    sq0 = torch.zeros(out, dtype=F64)
    w0_at = torch.zeros(out, r, dtype=F64)  # W0 @ Aᵀ in PEFT orientation, (out, r)
    step = rows_per_block(cols, block_elements)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        x = base_rows(start, stop)  # (stop - start, cols)
        if transposed:
            sq0 += x.square().sum(0)
            if r:
                w0_at += (a[:, start:stop] @ x).T
        else:
            sq0[start:stop] = torch.linalg.vector_norm(x, dim=1).square()
            if r:
                w0_at[start:stop] = x @ a.T
    if r:
        ud = s * (w0_at * b).sum(1)
        dd = s * s * ((b @ (a @ a.T)) * b).sum(1)
    else:
        ud = dd = torch.zeros(out, dtype=F64)
    if update.magnitude is None:
        return sq0.numpy(), (sq0 + 2 * ud + dd).numpy(), dd.numpy()
    m = update.magnitude
    norm_merged = (sq0 + 2 * ud + dd).clamp(min=0).sqrt()  # |u + d|
    sqd = m.square() - 2 * m * safe_ratio(sq0 + ud, norm_merged) + sq0
    return sq0.numpy(), m.square().numpy(), sqd.clamp(min=0).numpy()
