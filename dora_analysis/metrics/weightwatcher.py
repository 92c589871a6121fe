"""WeightWatcher's heavy-tailed ESD exponent of W0 and of Wt (``--weightwatcher``, extra ``[ww]``).

Martin & Mahoney's WeightWatcher (CalculatedContent/WeightWatcher) fits a power law to the tail
of the empirical spectral density of each layer — the eigenvalues of WᵀW/N — and reports its
exponent α (≈ 2 well trained; < 2 over-trained; > 6 under-trained, by the library's reading) and
α_weighted = α·log₁₀ λ_max. Papers pair such per-layer α with weight-update tables, so this
metric *calls the library* on each matrix — W0, then Wt (an adapter's merged weight) — and joins
its row to ours by the layer name; nothing of the fit is rebuilt here:

* ``ww_alpha_base``, ``ww_alpha_tuned`` — α of W0 and of Wt;
* ``ww_alpha_weighted_base``, ``ww_alpha_weighted_tuned`` — α_weighted of W0 and of Wt.

The matrix handed over is the 2-D view every metric uses (output channels as rows; a conv kernel
as ``out × in·k``), in float64, with WeightWatcher's default ``analyze()`` settings. It skips
matrices with fewer eigenvalues than its ``min_evals`` (8): NaN there, and for NaN/Inf weights.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import Column, Metric

if TYPE_CHECKING:
    from ..pairs import PairView

WW_ALPHA_BASE = "ww_alpha_base"
WW_ALPHA_TUNED = "ww_alpha_tuned"
WW_ALPHA_WEIGHTED_BASE = "ww_alpha_weighted_base"
WW_ALPHA_WEIGHTED_TUNED = "ww_alpha_weighted_tuned"
#: The optional dependency and the extra that installs it.
PACKAGE, EXTRA = "weightwatcher", "ww"
#: The library keeps module-level state (its logger, the fit's plotting back end): one call at
#: a time, whatever the analysis' worker threads do.
_LOCK = threading.Lock()


def library() -> Any:
    """The ``weightwatcher`` module, imported with its start-up log lines silenced;
    :class:`ConfigError` naming the extra when it is not installed."""
    logging.getLogger(PACKAGE).setLevel(logging.ERROR)  # before import: it logs while importing
    try:
        import weightwatcher
    except ImportError:
        raise ConfigError(f"--weightwatcher needs the {PACKAGE} package: pip install "
                          f"'dora-analysis[{EXTRA}]'") from None
    logging.getLogger(PACKAGE).setLevel(logging.ERROR)  # it resets its level on import
    return weightwatcher


def esd_alpha(w: Any, name: str = "matrix") -> tuple[float, float]:
    """``(α, α_weighted)`` of one matrix ``(out, in)`` (numpy or torch, any float dtype), as
    ``weightwatcher.WeightWatcher(model={name: W}).analyze()`` reports them for the layer
    ``name``; NaN when the library skips it (too few eigenvalues) or W holds NaN/Inf.

    Example:
        >>> import numpy as np
        >>> alpha, weighted = esd_alpha(np.random.default_rng(0).standard_t(3, (300, 200)))
        >>> 1 < alpha < 10
        True
    """
    import numpy as np

    from .arrays import float64

    x = float64(w)
    if x.ndim != 2 or not np.isfinite(x).all():
        return math.nan, math.nan
    ww = library()
    layer = name.removesuffix(".weight")
    with _LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the power-law fit's numerical warnings
        frame = ww.WeightWatcher(model={f"{layer}.weight": x}).analyze()
    row = frame[frame["name"].astype(str) == layer] if "name" in frame else frame.iloc[:0]
    if row.empty or "alpha" not in row:
        return math.nan, math.nan
    return float(row["alpha"].iloc[0]), float(row["alpha_weighted"].iloc[0])


def weightwatcher_columns(view: PairView) -> dict[str, float]:
    """α and α_weighted of W0 and Wt of one matrix pair (an adapter's Wt: the merged weight)."""
    w0, wt = view.weights()
    name = view.pair.name if view.pair.expert is None else f"{view.pair.name}.{view.pair.expert}"
    base, weighted_base = esd_alpha(w0.numpy(), name)
    tuned, weighted_tuned = esd_alpha(wt.numpy(), name)
    return {WW_ALPHA_BASE: base, WW_ALPHA_TUNED: tuned, WW_ALPHA_WEIGHTED_BASE: weighted_base,
            WW_ALPHA_WEIGHTED_TUNED: weighted_tuned}


def check_installed() -> None:
    """Refuse ``--weightwatcher`` before any work when the library is missing (without
    importing it: that takes seconds)."""
    import importlib.util

    if importlib.util.find_spec(PACKAGE) is None:
        raise ConfigError(f"--weightwatcher needs the {PACKAGE} package: pip install "
                          f"'dora-analysis[{EXTRA}]'")


METRIC = Metric(
    name="weightwatcher",
    description="WeightWatcher's ESD power-law exponent α (and α_weighted) of W0 and Wt, by "
                "calling the weightwatcher library (extra [ww])",
    columns=(
        Column(WW_ALPHA_BASE, "float64", "WeightWatcher α of W0"),
        Column(WW_ALPHA_TUNED, "float64", "WeightWatcher α of Wt"),
        Column(WW_ALPHA_WEIGHTED_BASE, "float64", "WeightWatcher α·log10 λ_max of W0"),
        Column(WW_ALPHA_WEIGHTED_TUNED, "float64", "WeightWatcher α·log10 λ_max of Wt"),
    ),
    compute=weightwatcher_columns,
    option="weightwatcher",
    per_axis=False,
    cost="svd",
    requires=check_installed,
)
