"""Update sparsity (``--sparsity``): which stored weights fine-tuning left exactly as they were.

Mukherjee et al. ("Reinforcement Learning Finetunes Small Subnetworks in Large Language Models",
NeurIPS 2025, arXiv 2505.11711) count the parameters a run did not update, in bf16, with
``isclose(Δ, 0, atol=1e-5)``; "The Path Not Taken" (arXiv 2511.08567) attributes part of that
sparsity to bf16 rounding hiding updates smaller than half a unit in the last place. So the
columns count changes both ways, and in ulps. With W0 and Wt as stored (output channels as rows)
and differences exact in float64:

* ``unchanged_fraction`` — share of elements whose stored value is bitwise unchanged;
* ``unchanged_fraction_tol`` — share with ``|wt − w0| ≤ tol`` (``--sparsity-tol``, 1e-5);
* ``unchanged_rows`` — share of output rows with every element bitwise unchanged;
* ``median_ulps`` — over the changed elements, the median (numpy's: the mean of the two middle
  values for an even count) of ``|wt − w0| / ulp(w0)``, ``ulp`` the gap from ``|w0|`` to the
  next larger magnitude of the base's stored dtype (``np.spacing``'s meaning). A bf16 update
  rounded away shows as no change; one that survives is at least ~1 ulp.

An adapter stands for the merged weight *as PEFT's* ``merge_and_unload`` *stores it*: W0 + s·B·A
(DoRA: Eq. 5) computed in float64, rounded once to the base's dtype (:func:`merged_weight`).
Non-finite elements count as changed unless bitwise equal; ``median_ulps`` ignores them.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

from .base import Column, Metric, Setting

if TYPE_CHECKING:  # numpy and the array helpers load on first use: the CLI lists options fast
    import numpy as np

    from ..pairs import PairView
    from .arrays import Stored

UNCHANGED_FRACTION = "unchanged_fraction"
UNCHANGED_FRACTION_TOL = "unchanged_fraction_tol"
UNCHANGED_ROWS = "unchanged_rows"
MEDIAN_ULPS = "median_ulps"
#: Mukherjee et al.'s tolerance (``torch.isclose(..., atol=1e-5)`` on bf16 weights).
DEFAULT_TOL = 1e-5


def non_negative(value: Any) -> float:
    """Check of ``--sparsity-tol``: a finite number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            0 <= value < math.inf):
        raise ValueError("must be a number ≥ 0")
    return float(value)


SPARSITY_TOL = Setting("sparsity_tol", DEFAULT_TOL, "--sparsity: |wt − w0| at most this counts "
                       "as unchanged in unchanged_fraction_tol", check=non_negative)


def unchanged_mask(w0: Any, wt: Any) -> np.ndarray:
    """Per element, whether the stored value is bitwise unchanged (boolean, ``w0``'s shape).

    Different stored dtypes (an fp32 base, a bf16 run) have no common bit pattern: there, the
    same value, sign of zero included, counts as unchanged (NaN never does).

    Example:
        >>> import numpy as np
        >>> unchanged_mask(np.array([0.0, 1.0]), np.array([-0.0, 1.0])).tolist()
        [False, True]
    """
    import numpy as np

    from .arrays import stored

    a, b = stored(w0), stored(wt)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.dtype == b.dtype:
        return a.bits == b.bits
    x, y = a.values(), b.values()
    return (x == y) & (np.signbit(x) == np.signbit(y))


def merged_weight(w0: Any, b: Any, a: Any, scale: float) -> Stored:
    """``W0 + scale·B·A`` computed in float64 and rounded once to W0's stored dtype: the weight
    PEFT's ``merge_and_unload`` stores for a LoRA module (``B`` out × r, ``A`` r × in).

    Example:
        >>> import numpy as np
        >>> w0 = np.zeros((2, 3), dtype=np.float16)
        >>> merged_weight(w0, np.ones((2, 1)), np.ones((1, 3)), 1e-8).values().tolist()[0]
        [0.0, 0.0, 0.0]
    """
    from .arrays import float64, rounded, stored

    base = stored(w0)
    return rounded(base.values() + scale * (float64(b) @ float64(a)), base.dtype)


def update_sparsity(w0: Any, wt: Any, tol: float = DEFAULT_TOL) -> dict[str, float]:
    """The four sparsity columns of one matrix pair as stored (output channels as rows).

    ``w0`` and ``wt``: numpy arrays or torch tensors of a stored float dtype (bf16 included), or
    :class:`~dora_analysis.metrics.arrays.Stored` (an adapter's :func:`merged_weight`). Shapes
    ``(out, in)``, equal.

    Example:
        >>> import numpy as np
        >>> w0 = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
        >>> wt = w0.copy(); wt[0, 0] = np.nextafter(np.float32(1), np.float32(2))
        >>> d = update_sparsity(w0, wt)
        >>> d["unchanged_fraction"], d["unchanged_rows"], d["median_ulps"]
        (0.8333333333333334, 0.6666666666666666, 1.0)
    """
    import numpy as np

    from .arrays import gaps, stored

    a, b = stored(w0), stored(wt)
    same = unchanged_mask(a, b)
    if same.ndim != 2:
        raise ValueError(f"a matrix (out, in) is expected, got shape {same.shape}")
    x, y = a.values(), b.values()
    changed = ~same
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(y - x)  # exact for two values of a narrower dtype
        ratio = diff[changed] / gaps(x[changed], a.dtype)
    ratio = ratio[np.isfinite(ratio)]
    return {
        UNCHANGED_FRACTION: float(same.mean()) if same.size else math.nan,
        UNCHANGED_FRACTION_TOL: float((diff <= tol).mean()) if same.size else math.nan,
        UNCHANGED_ROWS: float(same.all(axis=1).mean()) if same.size else math.nan,
        MEDIAN_ULPS: float(np.median(ratio)) if ratio.size else math.nan,
    }


def stored_pair(view: PairView) -> tuple[Stored, Stored]:
    """``(W0, Wt)`` of a view as stored, output channels as rows; an adapter's Wt is the merged
    weight rounded to the base's dtype (:func:`merged_weight`'s rule)."""
    from .arrays import dtype_name, rounded

    w0, wt = view.weights()  # float64, exact for the stored values
    base_dtype = dtype_name(view.pair.info.dtype)
    tuned_dtype = base_dtype if view.adapter_update() is not None else dtype_name(
        view.pair.tuned_dtype)
    return rounded(w0, base_dtype), rounded(wt, tuned_dtype)


def sparsity(view: PairView) -> dict[str, float]:
    """The ``--sparsity`` columns of one matrix pair (see the module docstring)."""
    w0, wt = stored_pair(view)
    return update_sparsity(w0, wt, view.config.setting("sparsity_tol"))


METRIC = Metric(
    name="sparsity",
    description="update sparsity: shares of weights unchanged (bitwise, within --sparsity-tol, "
                "whole rows) and the median change in ulps (Mukherjee et al. 2025)",
    columns=(
        Column(UNCHANGED_FRACTION, "float64", "share of elements whose stored value is bitwise "
               "unchanged"),
        Column(UNCHANGED_FRACTION_TOL, "float64", "share of elements with |wt − w0| ≤ "
               "--sparsity-tol"),
        Column(UNCHANGED_ROWS, "float64", "share of output rows with every element bitwise "
               "unchanged"),
        Column(MEDIAN_ULPS, "float64", "median over changed elements of |wt − w0| / ulp(w0) in "
               "the base's stored dtype", log_scale=True),
    ),
    compute=sparsity,
    option="sparsity",
    per_axis=False,
    cost="dense",
    settings=(SPARSITY_TOL,),
)
