"""Correlation of direction and magnitude changes (the regression line of the paper's Figure 2).

Over each group of points ``(delta_d, delta_m)`` — by default one checkpoint series × module kind
× axis, all layers and steps — Pearson r with its two-sided p-value, Spearman ρ, n, and the
least-squares line ``delta_m = slope · delta_d + intercept``. The paper reports, on VL-BART query
matrices: FT −0.62, DoRA −0.31, LoRA +0.83.

The pooled r mixes two sources of variation: all layers' changes growing together over training
(across steps) and layers differing at one moment (within a step). Beside it, per group:

* ``within_step_r`` — Pearson r across layers at each step, averaged over steps;
* ``within_layer_r`` — Pearson r across steps for each layer, averaged over layers;
* ``partial_r`` — r of ΔD and ΔM controlling for the step (each step's mean removed from both);
* ``r_ci_low``, ``r_ci_high`` — 95 % percentile bootstrap of the pooled r over layers;
* ``n_steps``, ``n_layers`` — the distinct steps and layers the group holds.

Points of one layer are not independent (the same matrix at several steps), so the bootstrap
resamples whole layers. Every statistic is NaN, never a fake ±1, where it is undefined.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd

from . import columns as C
from . import metrics as registry
from .config import N_BOOT
from .errors import ConfigError

#: Fewer points than this give no correlation (two points always lie on a line).
MIN_POINTS = 3
#: The bootstrap's seed is fixed (``N_BOOT`` resamples by default): tables are repeatable.
BOOT_SEED = 0
CI_LEVEL = 0.95


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
        (2.25, 0.998)
    """
    x, y = np.asarray(delta_d, float), np.asarray(delta_m, float)
    out = {C.N: len(x), C.PEARSON_R: math.nan, C.P_VALUE: math.nan, C.SPEARMAN_RHO: math.nan,
           C.SLOPE: math.nan, C.INTERCEPT: math.nan}
    if len(x) < MIN_POINTS or np.ptp(x) == 0:
        return out
    xc = x - x.mean()
    out[C.SLOPE] = float(xc @ (y - y.mean()) / (xc @ xc))
    out[C.INTERCEPT] = float(y.mean() - out[C.SLOPE] * x.mean())
    if np.ptp(y) == 0:
        return out
    r = pearson_r(x, y)
    out[C.PEARSON_R], out[C.P_VALUE] = r, pearson_p_value(r, len(x))
    ranks = (pd.Series(v).rank(method="average").to_numpy() for v in (x, y))
    out[C.SPEARMAN_RHO] = pearson_r(*ranks)
    return out


def pearson_p_value(r: float, n: int) -> float:
    """Two-sided p-value of Pearson ``r`` from ``n`` points under independence (normal data).

    Under the null hypothesis r follows a beta distribution on [−1, 1] with both shapes
    ``n/2 − 1``, so ``p = 2·I_{(1−|r|)/2}(n/2 − 1, n/2 − 1)``: the same formula as
    ``scipy.stats.pearsonr``, through ``scipy.special`` (0.1 s to import; scipy.stats takes ~0.9 s,
    which every ``dora-analyze`` run would pay).

    Example:
        >>> round(pearson_p_value(0.5, 10), 4), pearson_p_value(1.0, 5)
        (0.1411, 0.0)
    """
    from scipy.special import betainc

    if math.isnan(r):
        return math.nan
    shape = n / 2 - 1
    return float(2 * betainc(shape, shape, (1 - min(abs(r), 1.0)) / 2))


def _centred(v: np.ndarray, scale: float) -> np.ndarray | None:
    """``v`` minus its mean, or None when nothing is left but rounding (a constant)."""
    c = v - v.mean()
    # Subtracting a mean leaves about len(v) ulps of ``scale`` behind when v is constant.
    if not len(v) or np.max(np.abs(c)) <= 8 * len(v) * np.finfo(float).eps * scale:
        return None
    return c


def _r_of_centred(xc: np.ndarray | None, yc: np.ndarray | None) -> float:
    if xc is None or yc is None:
        return math.nan
    return float(np.clip(xc @ yc / math.sqrt((xc @ xc) * (yc @ yc)), -1.0, 1.0))


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two samples; NaN with fewer than 3 points or a constant coordinate.

    Example:
        >>> round(pearson_r(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 0.0])), 4)
        -0.982
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < MIN_POINTS:
        return math.nan
    return _r_of_centred(_centred(x, np.max(np.abs(x))), _centred(y, np.max(np.abs(y))))


def _codes(labels: np.ndarray | pd.Series) -> tuple[np.ndarray, int]:
    """Integer codes of labels (NaN/None is one label of its own) and the number of labels."""
    codes, uniques = pd.factorize(pd.Series(labels, dtype=object), use_na_sentinel=False)
    return codes, len(uniques)


def mean_r_within(x: np.ndarray, y: np.ndarray, labels: np.ndarray | pd.Series) -> float:
    """Pearson r inside each set of points sharing a label, averaged (plain mean) over labels.

    Labels whose points give no r (fewer than 3, or a constant coordinate) are left out of the
    mean; NaN when no label gives one. With labels = steps this is ``within_step_r`` (across
    layers at one step); with labels = layers, ``within_layer_r`` (across steps of one layer).

    Example:
        >>> x = np.array([1.0, 2, 3, 10, 11, 12])
        >>> y = np.array([3.0, 2, 1, 13, 12, 11])  # two steps, each a falling line
        >>> mean_r_within(x, y, np.array([1, 1, 1, 2, 2, 2]))
        -1.0
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    codes, k = _codes(labels)
    rs = [pearson_r(x[codes == i], y[codes == i]) for i in range(k)]
    rs = [r for r in rs if not math.isnan(r)]
    return float(np.mean(rs)) if rs else math.nan


def partial_r(x: np.ndarray, y: np.ndarray, steps: np.ndarray | pd.Series) -> float:
    """Pearson r of x and y controlling for the step (a categorical covariate).

    The r of the residuals of x and of y regressed on step indicators, i.e. after removing each
    step's mean from both. NaN unless ``n − n_steps ≥ 2`` (the residuals need one degree of
    freedom beyond their means) and both residuals vary. One step: equals the pooled r.

    Example:
        >>> x = np.array([1.0, 2, 3, 10, 11, 12])
        >>> y = np.array([3.0, 2, 1, 13, 12, 11])  # pooled r > 0, each step's r = -1
        >>> round(partial_r(x, y, np.array([1, 1, 1, 2, 2, 2])), 6)
        -1.0
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    codes, k = _codes(steps)
    if len(x) - k < 2:
        return math.nan
    counts = np.bincount(codes, minlength=k)
    rx = x - (np.bincount(codes, x, k) / counts)[codes]
    ry = y - (np.bincount(codes, y, k) / counts)[codes]
    tol = 8 * len(x) * np.finfo(float).eps
    flat = [np.max(np.abs(r)) <= tol * np.max(np.abs(v)) for r, v in ((rx, x), (ry, y))]
    return math.nan if any(flat) else _r_of_centred(rx, ry)


def bootstrap_r_ci(x: np.ndarray, y: np.ndarray, units: np.ndarray | pd.Series, *,
                   n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                   level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled Pearson r, resampling whole units (layers).

    Each of ``n_boot`` resamples draws as many units as there are, with replacement, keeping all
    points of a unit together (one layer's matrix at every step), and takes the pooled r of the
    points drawn. Resamples whose r is undefined (a constant coordinate) are dropped. NaN, NaN
    when there are fewer than 3 units, ``n_boot`` is 0, the pooled r itself is undefined, or no
    resample gives an r. The draws are ``numpy.random.default_rng(seed).integers(0, n_units,
    (n_boot, n_units))``, so the interval is repeatable.

    Example:
        >>> x = np.arange(12.0); y = x + np.tile([0.0, 1.0, -1.0], 4)
        >>> low, high = bootstrap_r_ci(x, y, np.repeat([0, 1, 2, 3], 3), n_boot=200)
        >>> bool(low < pearson_r(x, y) < high)
        True
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    codes, k = _codes(units)
    if k < MIN_POINTS or n_boot <= 0 or math.isnan(pearson_r(x, y)):
        return math.nan, math.nan
    # Standardised first: the moment sums below then hold O(1) numbers (no cancellation).
    xs, ys = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()
    sums = np.stack([np.bincount(codes, w, k) for w in
                     (np.ones_like(xs), xs, ys, xs * xs, ys * ys, xs * ys)], axis=1)  # (k, 6)
    draws = np.random.default_rng(seed).integers(0, k, size=(n_boot, k))
    counts = np.bincount((np.arange(n_boot)[:, None] * k + draws).ravel(),
                         minlength=n_boot * k).reshape(n_boot, k)  # (n_boot, k)
    n, sx, sy, sxx, syy, sxy = (counts @ sums).T  # each (n_boot,)
    vx, vy = sxx - sx * sx / n, syy - sy * sy / n
    ok = (vx > 1e-12 * sxx) & (vy > 1e-12 * syy)
    if not ok.any():
        return math.nan, math.nan
    r = np.clip((sxy - sx * sy / n)[ok] / np.sqrt(vx[ok] * vy[ok]), -1.0, 1.0)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(r, [tail, 100 - tail])
    return float(low), float(high)


def layer_units(group: pd.DataFrame) -> pd.Series:
    """The layer of each row, for the diagnostics; a row without one is a unit by its name."""
    layer = (group[C.LAYER].astype(object) if C.LAYER in group
             else pd.Series(None, index=group.index, dtype=object))
    names = (group[C.NAME].astype(str) if C.NAME in group
             else pd.Series(range(len(group)), index=group.index).astype(str))
    return layer.where(layer.notna(), "name:" + names)


def diagnostics(group: pd.DataFrame, *, n_boot: int = N_BOOT,
                seed: int = BOOT_SEED) -> dict[str, float]:
    """The diagnostics of one group's points (see the module docstring): which variation its r
    comes from, and how far it holds when layers are resampled.

    Steps are the ``step`` column (a missing step counts as one step of its own, so a single
    checkpoint has one step and its ``within_step_r`` and ``partial_r`` equal the pooled r);
    layers are the ``layer`` column (a row without a layer index is a layer of its own by name).
    """
    x, y = group[C.DELTA_D].to_numpy(float), group[C.DELTA_M].to_numpy(float)
    steps = (group[C.STEP] if C.STEP in group
             else pd.Series(None, index=group.index, dtype=object))
    layers = layer_units(group)
    low, high = bootstrap_r_ci(x, y, layers, n_boot=n_boot, seed=seed)
    return {C.N_STEPS: _codes(steps)[1], C.N_LAYERS: _codes(layers)[1],
            C.WITHIN_STEP_R: mean_r_within(x, y, steps),
            C.WITHIN_LAYER_R: mean_r_within(x, y, layers),
            C.PARTIAL_R: partial_r(x, y, steps), C.R_CI_LOW: low, C.R_CI_HIGH: high}


def summarised_columns(table: pd.DataFrame) -> list[str]:
    """Numeric metric columns of the registry that ``table`` holds, beyond Eqs. 3-4 and their
    bookkeeping: what the correlation table reports a group mean of."""
    return [col.name for metric in registry.METRICS if metric.name != "decomposition"
            for col in metric.columns
            if col.dtype in ("float64", "int64", "Int64") and col.name in table]


def correlate(table: pd.DataFrame, by: Sequence[str] = C.GROUP_COLUMNS, *,
              n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> pd.DataFrame:
    """The correlation table: one row per group (default: checkpoint × method × module × axis;
    ``by`` takes column names, or one name as a string).

    Rows with NaN/Inf statistics or non-finite weights are left out of every group. Beside the
    pooled statistics, the diagnostics of :func:`diagnostics` (``within_step_r``,
    ``within_layer_r``, ``partial_r``, ``r_ci_low``/``r_ci_high`` from ``n_boot`` bootstrap
    resamples over layers with the fixed ``seed``; ``n_boot=0`` leaves the interval NaN), and
    the group mean ``mean_<column>`` of every numeric metric column the table holds
    (:func:`summarised_columns`: ``mean_tangential_fraction``, ``mean_effective_rank`` …).

    Example:
        >>> import dora_analysis as da
        >>> summary = da.correlate(da.analyze("base.safetensors", "run/"))  # doctest: +SKIP
        >>> summary[["checkpoint", "module", "n", "pearson_r", "slope"]]  # doctest: +SKIP
    """
    by = [by] if isinstance(by, str) else list(by)  # one column name, never its letters
    if not all(isinstance(c, str) for c in by):
        raise ConfigError(f"by takes column names, got {by!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 0:
        raise ConfigError(f"n_boot must be a whole number, 0 or more, got {n_boot!r}")
    missing = [c for c in (*by, C.DELTA_M, C.DELTA_D) if c not in table.columns]
    if missing:
        raise ConfigError(f"the table has no column(s) {', '.join(missing)}; "
                          "pass a table made by dora_analysis.analyze")
    records, means = [], summarised_columns(table)
    points = usable_points(table)
    for key, group in points.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        record = dict(zip(by, key, strict=True))
        record.update(correlation(group[C.DELTA_D].to_numpy(), group[C.DELTA_M].to_numpy()))
        record[C.MEAN_DELTA_M] = float(group[C.DELTA_M].mean())
        record[C.MEAN_DELTA_D] = float(group[C.DELTA_D].mean())
        record.update(diagnostics(group, n_boot=n_boot, seed=seed))
        for col in means:
            values = pd.to_numeric(group[col], errors="coerce").astype("float64")
            record[f"mean_{col}"] = float(values.mean())
        records.append(record)
    frame = pd.DataFrame.from_records(
        records, columns=by + list(C.STAT_COLUMNS) + list(C.DIAGNOSTIC_COLUMNS)
        + [f"mean_{col}" for col in means])
    for col in (C.N, C.N_STEPS, C.N_LAYERS):
        frame[col] = frame[col].astype("int64")
    return frame
