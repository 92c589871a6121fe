"""Health checks: did this matrix train at all? The ``warnings`` column (always computed, from the
streaming sums and the adapter's own tensors; no extra reads of the weights).

Each check that fires adds its tag; ``warnings`` joins them with ``,`` (empty: nothing to report).

* ``lora_B_zero`` — an adapter module whose ``lora_B`` is all zeros and that has no trained
  DoRA magnitude either: B starts at zero, so the module never trained (a frozen or mis-targeted
  adapter; huggingface/peft#793). A DoRA module whose magnitude moved while B stayed zero is
  magnitude-only by design (paper Table 6, ``dora-train --magnitude-only``): it trained.
* ``unchanged`` — the tuned matrix equals the base exactly.
* ``below_precision_floor`` — it differs, but by less than rounding to the stored dtype would:
  the mean over vectors of ‖Δw‖²/‖w0‖² is at most twice the mean squared relative rounding error
  ``u²/(8 ln 2)`` of the coarser of the two stored dtypes (unit roundoff ``u``; bf16 2⁻⁸). Such
  an update is indistinguishable from re-rounding the base (ΔD then sits on the precision floor
  drawn in Figure 2).
* ``magnitude_frozen`` — a DoRA adapter whose magnitude vector still equals the base's vector
  norms (within the rounding of the stored dtypes): the magnitude was never trained
  (pytorch/torchtune#2250).
* ``nonfinite`` — NaN/Inf in the weights (also warned by name and counted in
  ``nonfinite_vectors``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..io.dtypes import unit_roundoff
from .base import Column, Metric

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..pairs import PairView

WARNINGS = "warnings"
LORA_B_ZERO = "lora_B_zero"
UNCHANGED = "unchanged"
BELOW_PRECISION_FLOOR = "below_precision_floor"
MAGNITUDE_FROZEN = "magnitude_frozen"
NONFINITE = "nonfinite"
#: Every tag, with the sentence the summaries print for it.
CHECKS: dict[str, str] = {
    LORA_B_ZERO: "adapter never trained (lora_B is all zeros)",
    UNCHANGED: "tuned weights identical to the base",
    BELOW_PRECISION_FLOOR: "update below the precision floor of the stored dtype",
    MAGNITUDE_FROZEN: "DoRA magnitude equal to the base norms (never trained)",
    NONFINITE: "NaN/Inf in the weights",
}
SEPARATOR = ","


def rounding_error_sq(u: float) -> float:
    """Mean squared relative error ``‖δ‖²/‖w‖²`` that rounding a vector once to unit roundoff
    ``u`` leaves: ``u²/(8 ln 2)`` (uniform error in ±ulp/2 over log-uniform mantissas; nearly
    all of it perpendicular to the vector, so ΔD's floor is half of it)."""
    return u * u / (8 * math.log(2))


def below_precision_floor(sq0: np.ndarray, sqd: np.ndarray, u: float) -> bool:
    """Whether mean(‖Δw‖²/‖w0‖²) over vectors with a base norm is within twice the expected
    relative rounding error of one rounding (:func:`rounding_error_sq`)."""
    valid = sq0 > 0
    if not bool(valid.any()) or u == 0.0:
        return False
    return float((sqd[valid] / sq0[valid]).mean()) <= 2 * rounding_error_sq(u)


def magnitude_frozen(view: PairView, magnitude: torch.Tensor, axis: str, u: float) -> bool:
    """Whether DoRA's magnitude equals the base's norms along ``axis`` within rounding."""
    import numpy as np
    import torch  # the magnitude is an adapter's tensor: torch is loaded

    if axis in view.sums_by_axis:
        norms = np.sqrt(view.sums_by_axis[axis].sq0)
    else:  # the magnitude runs along the other axis than the one analysed
        norms = torch.linalg.vector_norm(view.base_weight(), dim=1 if axis == "out" else 0)
        norms = norms.numpy()
    m = magnitude.detach().cpu().to(torch.float64).numpy()
    # The adapter's stored rounding, the base's, and a float32 norm computed at initialisation.
    tol = u + 16 * unit_roundoff("float32")
    return bool((np.abs(m - norms) <= tol * norms).all())


def health(view: PairView) -> dict[str, str]:
    """The ``warnings`` of one matrix pair along the view's axis (see the module docstring)."""
    from ..decompose import finite

    sums = view.sums()
    tags = []
    update = view.adapter_update()
    u = max(unit_roundoff(view.pair.info.dtype), unit_roundoff(view.pair.tuned_dtype))
    frozen = update is not None and update.magnitude is not None and magnitude_frozen(
        view, update.magnitude, update.magnitude_axis, u + unit_roundoff(update.dtype))
    if update is not None and update.lora_b is not None and update.rank \
            and not bool(update.lora_b.any()) and (update.magnitude is None or frozen):
        tags.append(LORA_B_ZERO)  # with a trained magnitude: magnitude-only, not untrained
    if not finite(sums).all():
        tags.append(NONFINITE)
    elif not sums.sqd.any():
        tags.append(UNCHANGED)
    elif below_precision_floor(sums.sq0, sums.sqd, u):
        tags.append(BELOW_PRECISION_FLOOR)
    if frozen:
        tags.append(MAGNITUDE_FROZEN)
    return {WARNINGS: SEPARATOR.join(tags)}


def split(warnings: str | float | None) -> list[str]:
    """The tags of one ``warnings`` cell (empty, NaN or None: none)."""
    if not isinstance(warnings, str):
        return []
    return [t for t in warnings.split(SEPARATOR) if t]


METRIC = Metric(
    name="health",
    description="health checks: untrained adapter, unchanged or below-precision update, frozen "
                "DoRA magnitude, non-finite weights",
    columns=(Column(WARNINGS, "string", "comma-separated health tags: " + ", ".join(CHECKS)),),
    compute=health,
)
