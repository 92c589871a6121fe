"""Every metric of the table on two in-memory matrices: the registry's own functions, on arrays.

:func:`measure` wraps W0 and Wt (numpy arrays or torch tensors, any float dtype, bfloat16
included; output channels as rows) — or W0 and a LoRA/DoRA update given as its factors
``(B, A, scale)`` and magnitude — in the same sources and :class:`~dora_analysis.pairs.PairView`
the analysis of files builds, and runs the registry's metrics on them. So each column has one
implementation, whether it comes from files or arrays; factors take the closed forms the table
takes for adapters (the r × r core of ``--spectrum``, Lanczos on ``W0·x + s·B·(A·x)`` for
``--intruders``, no B·A where none is needed). The named functions below are :func:`measure`
restricted to one metric.

Example:
    >>> import torch
    >>> w0 = torch.randn(12, 20, dtype=torch.float64)
    >>> round(tangential_fraction(w0, 2 * w0), 12)  # a pure rescale turns nothing
    0.0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import AnalysisConfig
from .decompose import check_axis
from .io.adapters import Adapter, LowRankUpdate
from .io.memory import StateDictSource
from .io.merge import AdapterSource
from .metrics.arrays import float64, is_torch, stored
from .pairs import MatrixPair, PairView, stream_sums

#: The name the two matrices go by inside (what notes and the SVD cache key name).
NAME = "matrix.weight"
F64 = torch.float64


def as_tensor(x: Any) -> torch.Tensor:
    """A torch tensor of ``x``'s own float dtype (numpy float16/32/64, ml_dtypes bfloat16,
    torch); other input becomes float64."""
    if is_torch(x):
        return x.detach().cpu()
    import numpy as np

    array = np.asarray(x)
    if array.dtype.name == "bfloat16":
        bits = stored(array).bits.astype(np.int16)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)
    if array.dtype.name in ("float16", "float32", "float64"):
        return torch.from_numpy(np.ascontiguousarray(array))
    return torch.from_numpy(float64(array))


def lora_update(lora: tuple[Any, Any, float], magnitude: Any = None,
                magnitude_axis: str = "out") -> LowRankUpdate:
    """A :class:`~dora_analysis.io.adapters.LowRankUpdate` from ``(B (out × r), A (r × in),
    scale)`` and an optional DoRA magnitude (one per output row, or per input column)."""
    b, a, scale = lora
    a, b = as_tensor(a), as_tensor(b)
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"lora takes (B (out × r), A (r × in), scale), got shapes "
                         f"{tuple(b.shape)} and {tuple(a.shape)}")
    m = None if magnitude is None else as_tensor(magnitude).to(F64).flatten()
    return LowRankUpdate(a, b, float(scale), magnitude=m, magnitude_axis=check_axis(
        magnitude_axis), dtype=a.dtype)


def pair_view(w0: Any, wt: Any = None, *, lora: tuple[Any, Any, float] | None = None,
              magnitude: Any = None, magnitude_axis: str = "out",
              config: AnalysisConfig | None = None) -> PairView:
    """The :class:`~dora_analysis.pairs.PairView` of two in-memory matrices (or of W0 and an
    adapter's factors), with the per-vector sums of every axis of ``config``."""
    config = config or AnalysisConfig()
    base_matrix = as_tensor(w0)
    if base_matrix.dim() != 2:
        raise ValueError(f"W0 must be a matrix (out, in), got shape {tuple(base_matrix.shape)}")
    base = StateDictSource({NAME: base_matrix}, "<W0>")
    if (wt is None) == (lora is None and magnitude is None):
        raise ValueError("give Wt, or the update as lora=(B, A, scale) (and/or magnitude=)")
    if wt is not None:
        tuned_matrix = as_tensor(wt)
        if tuned_matrix.shape != base_matrix.shape:
            raise ValueError(f"W0 and Wt differ in shape: {tuple(base_matrix.shape)} vs "
                             f"{tuple(tuned_matrix.shape)}")
        tuned = StateDictSource({NAME: tuned_matrix}, "<Wt>")
    else:
        update = (lora_update(lora, magnitude, magnitude_axis) if lora is not None else
                  LowRankUpdate(None, None, 1.0, as_tensor(magnitude).to(F64).flatten(),
                                check_axis(magnitude_axis)))
        adapter = Adapter("arrays", Path("<adapter>"), {NAME.removesuffix(".weight"): update})
        tuned = AdapterSource(adapter, base)
    pair = MatrixPair(NAME, NAME, base.info(NAME), tuned.info(NAME).dtype, transposed=False)
    sums = stream_sums(base, tuned, pair, config.axes, config.block_elements)
    return PairView(pair, base, tuned, config, sums, config.axes[0])


def measure(w0: Any, wt: Any = None, *, lora: tuple[Any, Any, float] | None = None,
            magnitude: Any = None, magnitude_axis: str = "out", axis: str = "out",
            **settings) -> dict[str, Any]:
    """Every column the table would hold for this pair: the always-on metrics and those
    switched on in ``settings`` (``spectrum=True``, ``sparsity=True``, ``intruder_k=20`` …, as
    :func:`dora_analysis.analyze` takes them). ``axis="both"`` gives ``{"out": …, "in": …}``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> w0 = torch.randn(16, 24, generator=g, dtype=torch.float64)
        >>> b, a = torch.randn(16, 2, generator=g), torch.randn(2, 24, generator=g)
        >>> measure(w0, lora=(b, a, 0.5), spectrum=True)["stable_rank"] <= 2
        True
    """
    from .analysis import metric_values  # the table's own per-pair step

    config = AnalysisConfig.from_settings(axis=axis, **settings)
    values = metric_values(pair_view(w0, wt, lora=lora, magnitude=magnitude,
                                     magnitude_axis=magnitude_axis, config=config))
    return values if axis == "both" else values[axis]


def tangential_fraction(w0: Any, wt: Any = None, *, axis: str = "out", **update) -> float:
    """Mean over vectors of the share of ‖Δw‖² orthogonal to w0 (1 = a pure turn, 0 = a pure
    rescale; NaN when nothing changed); ``update``: ``lora=(B, A, s)``, ``magnitude=``."""
    return measure(w0, wt, axis=axis, **update)["tangential_fraction"]


def delta_m_split(w0: Any, wt: Any = None, *, axis: str = "out", **update) -> dict[str, float]:
    """``delta_m_radial`` and ``delta_m_sideways``: ΔM had each vector's step been purely radial
    or purely sideways (:mod:`dora_analysis.metrics.radial`)."""
    row = measure(w0, wt, axis=axis, **update)
    return {k: row[k] for k in ("delta_m_radial", "delta_m_sideways")}


def health_warnings(w0: Any, wt: Any = None, **update) -> list[str]:
    """The health tags of one pair (:mod:`dora_analysis.metrics.health`): ``unchanged``,
    ``below_precision_floor`` (dtypes as given), ``nonfinite``; with ``lora=``/``magnitude=``
    also ``lora_B_zero`` and ``magnitude_frozen``."""
    from .metrics.health import split

    return split(measure(w0, wt, **update)["warnings"])


def update_spectrum(w0: Any, wt: Any = None, **options) -> dict[str, float]:
    """The ``--spectrum`` columns (:mod:`dora_analysis.metrics.spectrum`); from the r × r core
    when the update is given as ``lora=(B, A, scale)``. ``options``: ``amplification_rank``,
    ``device``, ``lora``, ``magnitude``."""
    from .metrics.spectrum import METRIC

    row = measure(w0, wt, spectrum=True, **options)
    return {c.name: row[c.name] for c in METRIC.columns}


def count_intruders(w0: Any, wt: Any = None, *, k: int = 10, eps: float = 0.5, **options
                    ) -> int:
    """How many of the top-k left singular vectors of Wt have no |cos| ≥ ε with W0's
    (:mod:`dora_analysis.metrics.intruders`); ``options``: ``lora``, ``svd_cache``, ``device``."""
    options.setdefault("svd_cache", "none")  # arrays have no file identity worth caching
    return measure(w0, wt, intruders=True, intruder_k=k, intruder_eps=eps, **options)[
        "intruders"]
