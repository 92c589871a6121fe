"""correlate(): Pearson, Spearman and the least-squares line per group, against numpy/scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.stats import correlation, pearson_p_value


def table_from(points: dict[tuple[str, str], list[tuple[float, float]]]) -> pd.DataFrame:
    rows = []
    for (label, module), pts in points.items():
        for i, (dd, dm) in enumerate(pts):
            rows.append({C.CHECKPOINT: label, C.METHOD: "ft", C.MODULE: module, C.AXIS: "out",
                         C.LAYER: i, C.DELTA_D: dd, C.DELTA_M: dm, C.NONFINITE_VECTORS: 0})
    return pd.DataFrame(rows)


def test_hand_computed_line():
    # y = 2x + 1 exactly: r = 1, slope 2, intercept 1
    r = correlation(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 3.0, 5.0, 7.0]))
    assert r[C.PEARSON_R] == pytest.approx(1.0) and r[C.SPEARMAN_RHO] == pytest.approx(1.0)
    assert r[C.SLOPE] == pytest.approx(2.0) and r[C.INTERCEPT] == pytest.approx(1.0)
    assert r[C.N] == 4


@pytest.mark.parametrize("n", [3, 4, 6, 24, 200])
@pytest.mark.parametrize("r", [-1.0, -0.999999, -0.62, -0.05, 0.0, 0.31, 0.83, 0.99999999, 1.0])
def test_p_value_equals_scipy_stats(n, r):
    # pearsonr's p from data built to have exactly this r, against our closed form
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n)
    x = (x - x.mean()) / np.linalg.norm(x - x.mean())
    z = rng.standard_normal(n)
    z -= z.mean() + (z @ x) * x
    z /= np.linalg.norm(z)
    y = r * x + math.sqrt(max(0.0, 1 - r * r)) * z
    expected = stats.pearsonr(x, y)
    got = pearson_p_value(float(expected.statistic), n)
    if abs(r) < 0.999:
        assert got == pytest.approx(expected.pvalue, rel=1e-9)
    else:  # p ~ (1 − |r|)^(n/2 − 1): the last bits of r decide it, both are vanishing
        assert got < 1e-7 or n <= 4
        logs = [math.log10(max(v, 1e-300)) for v in (got, expected.pvalue)]
        assert logs[0] == pytest.approx(logs[1], abs=2)


def test_spearman_with_ties_equals_scipy():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 8.0])
    y = np.array([0.3, 0.1, 0.1, 0.9, 0.4, 0.7, 0.7, 1.2])
    r = correlation(x, y)
    assert r[C.SPEARMAN_RHO] == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)
    fit = stats.linregress(x, y)
    assert r[C.SLOPE] == pytest.approx(fit.slope, rel=1e-12)
    assert r[C.INTERCEPT] == pytest.approx(fit.intercept, rel=1e-12)


def test_the_command_line_does_not_load_scipy_stats(tmp_path):
    # scipy.stats costs ~0.9 s to import: a whole dora-analyze run must not pay it
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    w = {f"layers.{i}.q.weight": torch.randn(4, 3) for i in range(3)}
    save_file(w, tmp_path / "a.safetensors")
    save_file({k: v + 0.1 for k, v in w.items()}, tmp_path / "b.safetensors")
    argv = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-q",
            "--summary", str(tmp_path / "s.csv")]
    code = ("import sys; from dora_analysis.cli import main; "
            f"code = main({argv!r}); print(code, 'scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["0", "False"], out.stdout + out.stderr


def test_matches_numpy_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.random(20) * 1e-3
    y = -0.6 * x / 1e-3 + rng.normal(size=20)
    r = correlation(x, y)
    assert r[C.PEARSON_R] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert r[C.P_VALUE] == pytest.approx(stats.pearsonr(x, y).pvalue, rel=1e-9)
    assert r[C.SPEARMAN_RHO] == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)
    slope, intercept = np.polyfit(x, y, 1)
    assert r[C.SLOPE] == pytest.approx(slope, rel=1e-9)
    assert r[C.INTERCEPT] == pytest.approx(intercept, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("x, y", [
    ([1.0, 2.0], [1.0, 2.0]),            # too few points
    ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]),  # no spread in x
])
def test_undefined_is_nan(x, y):
    r = correlation(np.array(x), np.array(y))
    assert math.isnan(r[C.PEARSON_R]) and math.isnan(r[C.SLOPE])


def test_constant_y_has_a_slope_but_no_correlation():
    r = correlation(np.array([1.0, 2.0, 3.0]), np.array([5.0, 5.0, 5.0]))
    assert r[C.SLOPE] == 0.0 and math.isnan(r[C.PEARSON_R])


def test_groups_by_checkpoint_and_module():
    table = table_from({
        ("FT", "q"): [(1, 3), (2, 2), (3, 1)],
        ("LoRA", "q"): [(1, 1), (2, 2), (3, 3.5)],
        ("LoRA", "v"): [(1, 1), (2, 2)],
    })
    out = da.correlate(table)
    assert list(out.columns[:4]) == ["checkpoint", "method", "module", "axis"]
    assert {"n", "pearson_r", "p_value", "spearman_rho", "slope", "intercept"} <= set(out.columns)
    got = {(r.checkpoint, r.module): r for r in out.itertuples()}
    assert got[("FT", "q")].pearson_r == pytest.approx(-1.0)
    assert got[("LoRA", "q")].pearson_r > 0.99
    assert got[("LoRA", "v")].n == 2 and math.isnan(got[("LoRA", "v")].pearson_r)


def test_non_finite_rows_are_left_out():
    table = table_from({("FT", "q"): [(1, 3), (2, 2), (3, 1), (float("nan"), 1), (4, 0)]})
    table.loc[4, C.NONFINITE_VECTORS] = 2
    out = da.correlate(table)
    assert out[C.N].item() == 3


def test_custom_grouping_and_bad_table():
    table = table_from({("A", "q"): [(1, 1), (2, 2), (3, 3)], ("B", "q"): [(1, 3), (2, 2), (3, 1)]})
    assert len(da.correlate(table, by=[C.MODULE])) == 1
    with pytest.raises(da.DoraAnalysisError, match="no column"):
        da.correlate(pd.DataFrame({"x": [1]}))


# -- diagnostics: within-step, within-layer, partial r, bootstrap CI over layers ------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dora_analysis.stats import (  # noqa: E402
    bootstrap_r_ci,
    diagnostics,
    mean_r_within,
    partial_r,
    pearson_r,
)


def series(x: np.ndarray, y: np.ndarray, steps: np.ndarray, layers: np.ndarray,
           label: str = "run") -> pd.DataFrame:
    return pd.DataFrame({C.CHECKPOINT: label, C.METHOD: "ft", C.MODULE: "q", C.AXIS: "out",
                         C.STEP: steps, C.LAYER: layers, C.NAME: [f"l{k}.q" for k in layers],
                         C.DELTA_D: x, C.DELTA_M: y, C.NONFINITE_VECTORS: 0})


def grid(n_steps: int, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    steps, layers = np.meshgrid(np.arange(1, n_steps + 1), np.arange(n_layers), indexing="ij")
    return steps.ravel(), layers.ravel()


def test_hand_computed_diagnostics_separate_the_two_sources_of_variation():
    # ΔD = 10 s + L, ΔM = 10 s − L: over steps both grow (within a layer r = +1); at one step the
    # deeper layer turns more and rescales less (within a step r = −1). Pooled:
    # cov = 100 var(s) − var(L) = 200/3 − 2/3 = 66, var = 202/3 each, r = 99/101.
    steps, layers = grid(3, 3)
    x, y = 10.0 * steps + layers, 10.0 * steps - layers
    out = da.correlate(series(x, y, steps, layers)).iloc[0]
    assert out[C.PEARSON_R] == pytest.approx(99 / 101, rel=1e-12)
    assert out[C.WITHIN_STEP_R] == pytest.approx(-1.0, rel=1e-12)
    assert out[C.WITHIN_LAYER_R] == pytest.approx(1.0, rel=1e-12)
    assert out[C.PARTIAL_R] == pytest.approx(-1.0, rel=1e-12)
    assert (out[C.N_STEPS], out[C.N_LAYERS], out[C.N]) == (3, 3, 9)
    assert -1.0 <= out[C.R_CI_LOW] <= out[C.PEARSON_R] <= out[C.R_CI_HIGH] <= 1.0


def test_within_r_averages_only_the_defined_groups():
    # step 1: r = +1 (3 points); step 2: r = −0.5 by hand; step 3: constant ΔD (undefined);
    # step 4: two points (undefined). Mean of the defined: (1 − 0.5) / 2 = 0.25.
    x = np.array([1, 2, 3, 1, 2, 3, 0.1, 0.1, 0.1, 1, 2], float)
    y = np.array([1, 2, 3, 2, 3, 1, 1, 2, 3, 1, 2], float)
    steps = np.array([1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4])
    assert pearson_r(x[3:6], y[3:6]) == pytest.approx(-0.5, rel=1e-12)
    assert mean_r_within(x, y, steps) == pytest.approx(0.25, rel=1e-12)
    assert math.isnan(mean_r_within(x[6:], y[6:], steps[6:]))


def step_dummies(steps: np.ndarray) -> np.ndarray:
    levels = np.unique(steps)
    return (steps[:, None] == levels[None, 1:]).astype(float)  # drop one level (intercept)


def test_partial_r_matches_the_precision_matrix_formula_and_least_squares_residuals():
    rng = np.random.default_rng(1)
    steps, layers = grid(4, 6)
    x = 1e-4 * (steps + rng.random(24))
    y = 1e-3 * steps + 1e-4 * rng.normal(size=24) - 3 * x
    # pingouin-style: partial r = −P_xy / sqrt(P_xx P_yy), P the inverse correlation matrix of
    # (x, y, step indicators).
    precision = np.linalg.inv(np.corrcoef(np.column_stack([x, y, step_dummies(steps)]).T))
    expected = -precision[0, 1] / math.sqrt(precision[0, 0] * precision[1, 1])
    assert partial_r(x, y, steps) == pytest.approx(expected, rel=1e-9)
    design = np.column_stack([np.ones(24), step_dummies(steps)])
    rx = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    ry = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    assert partial_r(x, y, steps) == pytest.approx(np.corrcoef(rx, ry)[0, 1], rel=1e-9)


def reference_bootstrap(x, y, layers, n_boot, seed):
    """The loop the vectorised bootstrap replaces: the same draws, np.corrcoef per resample."""
    units = list(dict.fromkeys(layers))
    draws = np.random.default_rng(seed).integers(0, len(units), size=(n_boot, len(units)))
    rs = []
    for row in draws:
        pick = np.concatenate([np.flatnonzero(layers == units[i]) for i in row])
        xs, ys = x[pick], y[pick]
        if np.ptp(xs) > 0 and np.ptp(ys) > 0:
            rs.append(np.corrcoef(xs, ys)[0, 1])
    return np.percentile(rs, [2.5, 97.5])


def test_bootstrap_matches_a_loop_over_resampled_layers():
    rng = np.random.default_rng(2)
    steps, layers = grid(4, 6)
    x = 2e-4 * steps * (1 + layers) + 1e-5 * rng.random(24)
    y = 1e-3 * steps - 1e-4 * layers + 1e-4 * rng.normal(size=24)
    low, high = bootstrap_r_ci(x, y, layers, n_boot=300, seed=7)
    assert (low, high) == pytest.approx(tuple(reference_bootstrap(x, y, layers, 300, 7)),
                                        rel=1e-9)
    assert (low, high) == bootstrap_r_ci(x, y, layers, n_boot=300, seed=7)  # repeatable
    assert low < pearson_r(x, y) < high


def test_too_few_points_give_nan_never_a_fake_one():
    # Three points in two steps: the step residuals are (a, −a, 0) and (c, −c, 0), always r = ±1.
    x, y, steps = np.array([1.0, 2, 5]), np.array([2.0, 1, 7]), np.array([1, 1, 2])
    assert math.isnan(partial_r(x, y, steps))
    # Every step a single point: nothing is left after removing the step means.
    assert math.isnan(partial_r(np.arange(4.0), np.arange(4.0) ** 2, np.arange(4)))
    # Two layers: no interval; each layer one point: no within-layer r.
    assert all(math.isnan(v) for v in bootstrap_r_ci(np.arange(6.0), np.arange(6.0) ** 2,
                                                      np.repeat([0, 1], 3)))
    steps, layers = grid(1, 5)
    d = diagnostics(series(np.arange(5.0), np.arange(5.0) ** 2, steps, layers))
    assert math.isnan(d[C.WITHIN_LAYER_R]) and d[C.N_STEPS] == 1
    # Within-step: two layers per step give no r at any step.
    steps, layers = grid(4, 2)
    d = diagnostics(series(np.arange(8.0), np.arange(8.0) ** 2, steps, layers))
    assert math.isnan(d[C.WITHIN_STEP_R]) and math.isnan(d[C.R_CI_LOW])
    # Constant ΔD inside each step (up to rounding of the step mean): no within-step r.
    steps, layers = grid(3, 4)
    x = np.repeat([0.1, 0.7, 1.3], 4)
    assert math.isnan(mean_r_within(x, np.arange(12.0), steps))
    assert math.isnan(partial_r(x, np.arange(12.0), steps))


def test_single_checkpoint_within_step_and_partial_r_equal_the_pooled_r():
    rng = np.random.default_rng(3)
    layers = np.arange(6)
    table = series(rng.random(6), rng.random(6), np.full(6, np.nan), layers)
    out = da.correlate(table).iloc[0]
    assert out[C.WITHIN_STEP_R] == pytest.approx(out[C.PEARSON_R], rel=1e-12)
    assert out[C.PARTIAL_R] == pytest.approx(out[C.PEARSON_R], rel=1e-12)
    assert math.isnan(out[C.WITHIN_LAYER_R]) and out[C.N_STEPS] == 1 and out[C.N_LAYERS] == 6


def test_partial_r_is_the_r_of_step_centred_points():
    """What docs/reproduction.md first called the within-step r (step means removed)."""
    rng = np.random.default_rng(4)
    steps, layers = grid(4, 6)
    table = series(rng.random(24) * steps, rng.random(24) + steps, steps, layers)
    centred = table.copy()
    for col in (C.DELTA_D, C.DELTA_M):
        centred[col] -= table.groupby(C.STEP)[col].transform("mean")
    assert da.correlate(table)[C.PARTIAL_R].item() == pytest.approx(
        da.correlate(centred)[C.PEARSON_R].item(), rel=1e-10)


def test_rows_without_a_layer_are_units_of_their_own():
    table = series(np.arange(6.0), np.arange(6.0) ** 2, np.repeat([1, 2], 3),
                   np.array([0, 1, 2, 0, 1, 2]))
    table[C.LAYER] = table[C.LAYER].astype(object)
    table.loc[[2, 5], C.LAYER] = None  # e.g. a classifier head: one unit per name
    table.loc[[2, 5], C.NAME] = "classifier"
    assert diagnostics(table)[C.N_LAYERS] == 3


def test_correlate_options_and_columns():
    steps, layers = grid(3, 8)
    rng = np.random.default_rng(5)
    table = series(rng.random(24), rng.random(24), steps, layers)
    out = da.correlate(table)
    assert list(out.columns) == list(C.CORRELATION_COLUMNS)
    assert out[C.N_STEPS].dtype == "int64"
    without = da.correlate(table, n_boot=0)
    assert without[C.R_CI_LOW].isna().all() and without[C.R_CI_HIGH].isna().all()
    other_seed = da.correlate(table, seed=1)
    assert (other_seed[C.R_CI_LOW].item(), other_seed[C.R_CI_HIGH].item()) != (
        out[C.R_CI_LOW].item(), out[C.R_CI_HIGH].item())
    with pytest.raises(da.DoraAnalysisError, match="n_boot"):
        da.correlate(table, n_boot=-1)


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shift_x=st.lists(finite, min_size=4, max_size=4),
       shift_y=st.lists(finite, min_size=4, max_size=4), scale=st.floats(1e-6, 1e6))
def test_invariants(seed, shift_x, shift_y, scale):
    rng = np.random.default_rng(seed)
    steps, layers = grid(4, 5)
    x, y = rng.random(20), rng.random(20) + 0.3 * steps
    base = diagnostics(series(x, y, steps, layers), n_boot=200)
    # A constant per step added to ΔD and ΔM changes nothing within a step.
    sx, sy = np.array(shift_x)[steps - 1], np.array(shift_y)[steps - 1]
    shifted = diagnostics(series(x + sx, y + sy, steps, layers), n_boot=200)
    assert shifted[C.WITHIN_STEP_R] == pytest.approx(base[C.WITHIN_STEP_R], abs=1e-7)
    assert shifted[C.PARTIAL_R] == pytest.approx(base[C.PARTIAL_R], abs=1e-7)
    # A constant per layer changes nothing within a layer.
    lx, ly = np.array(shift_x + [1.0])[layers], np.array(shift_y + [2.0])[layers]
    per_layer = diagnostics(series(x + lx, y + ly, steps, layers), n_boot=200)
    assert per_layer[C.WITHIN_LAYER_R] == pytest.approx(base[C.WITHIN_LAYER_R], abs=1e-7)
    # Units do not matter; flipping ΔM's sign flips every r and mirrors the interval.
    scaled = diagnostics(series(scale * x, y / scale, steps, layers), n_boot=200)
    flipped = diagnostics(series(x, -y, steps, layers), n_boot=200)
    for col in (C.WITHIN_STEP_R, C.WITHIN_LAYER_R, C.PARTIAL_R, C.R_CI_LOW, C.R_CI_HIGH):
        assert scaled[col] == pytest.approx(base[col], abs=1e-9)
    for col in (C.WITHIN_STEP_R, C.WITHIN_LAYER_R, C.PARTIAL_R):
        assert flipped[col] == pytest.approx(-base[col], abs=1e-12)
    assert flipped[C.R_CI_LOW] == pytest.approx(-base[C.R_CI_HIGH], abs=1e-12)
    assert flipped[C.R_CI_HIGH] == pytest.approx(-base[C.R_CI_LOW], abs=1e-12)


def test_metric_columns_from_the_registry_are_averaged_per_group(ckpts):
    table = da.analyze(ckpts["base"], ckpts["series"], modules=("q", "v"), spectrum=True)
    out = da.correlate(table, n_boot=0)
    for col in ("tangential_fraction", "effective_rank", "energy_rank_90", "relative_update"):
        assert f"mean_{col}" in out
    q = table[table[C.MODULE] == "q"]
    got = out.set_index(C.MODULE).loc["q"]
    assert got["mean_tangential_fraction"] == pytest.approx(q["tangential_fraction"].mean())
    assert got["mean_energy_rank_90"] == pytest.approx(q["energy_rank_90"].astype(float).mean())
    assert "mean_warnings" not in out and "mean_zero_vectors" not in out
