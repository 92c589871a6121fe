"""Correlation of direction and magnitude changes (the regression line of the paper's Figure 2).

Over each group of points ``(delta_d, delta_m)`` — by default one checkpoint series × module kind
× axis, all layers and steps — Pearson r with its two-sided p-value, Spearman ρ, n, and the
least-squares line ``delta_m = slope · delta_d + intercept``. The paper reports, on VL-BART query
matrices: FT −0.62, DoRA −0.31, LoRA +0.83.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from . import columns as C
from .errors import ConfigError

#: Fewer points than this give no correlation (two points always lie on a line).
MIN_POINTS = 3


def usable_points(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose ΔM and ΔD are finite and whose weights held no NaN/Inf."""
    finite = np.isfinite(table[C.DELTA_M].to_numpy(float)) & np.isfinite(
        table[C.DELTA_D].to_numpy(float)
    )
    if C.NONFINITE_VECTORS in table:
        finite &= table[C.NONFINITE_VECTORS].to_numpy() == 0
    return table[finite]


def correlation(delta_d: np.ndarray, delta_m: np.ndarray) -> dict[str, float]:
    """Pearson r and p, Spearman ρ and the least-squares line of ``delta_m`` on ``delta_d``.

    NaN where undefined (fewer than 3 points, or a constant coordinate).

    Example:
        >>> r = correlation(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5]))
        >>> round(r["slope"], 2), round(r["pearson_r"], 3)
        (2.25, 0.999)
    """
    from scipy import stats  # imported here: scipy.stats costs ~1 s at start-up

    x, y = np.asarray(delta_d, float), np.asarray(delta_m, float)
    out = {C.N: len(x), C.PEARSON_R: math.nan, C.P_VALUE: math.nan, C.SPEARMAN_RHO: math.nan,
           C.SLOPE: math.nan, C.INTERCEPT: math.nan}
    if len(x) < MIN_POINTS or np.ptp(x) == 0:
        return out
    fit = stats.linregress(x, y)
    out[C.SLOPE], out[C.INTERCEPT] = float(fit.slope), float(fit.intercept)
    if np.ptp(y) == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on near-constant input; the NaN says it
        pearson = stats.pearsonr(x, y)
        out[C.PEARSON_R], out[C.P_VALUE] = float(pearson.statistic), float(pearson.pvalue)
        out[C.SPEARMAN_RHO] = float(stats.spearmanr(x, y).statistic)
    return out


def correlate(table: pd.DataFrame, by: Sequence[str] = C.GROUP_COLUMNS) -> pd.DataFrame:
    """The correlation table: one row per group (default: checkpoint × method × module × axis).

    Rows with NaN/Inf statistics or non-finite weights are left out of every group.

    Example:
        >>> import dora_analysis as da
        >>> summary = da.correlate(da.analyze("base.safetensors", "run/"))  # doctest: +SKIP
        >>> summary[["checkpoint", "module", "n", "pearson_r", "slope"]]  # doctest: +SKIP
    """
    by = list(by)
    missing = [c for c in (*by, C.DELTA_M, C.DELTA_D) if c not in table.columns]
    if missing:
        raise ConfigError(f"the table has no column(s) {', '.join(missing)}; "
                          "pass a table made by dora_analysis.analyze")
    records = []
    points = usable_points(table)
    for key, group in points.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        record = dict(zip(by, key, strict=True))
        record.update(correlation(group[C.DELTA_D].to_numpy(), group[C.DELTA_M].to_numpy()))
        record[C.MEAN_DELTA_M] = float(group[C.DELTA_M].mean())
        record[C.MEAN_DELTA_D] = float(group[C.DELTA_D].mean())
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=by + list(C.STAT_COLUMNS))
    frame[C.N] = frame[C.N].astype("int64")
    return frame
