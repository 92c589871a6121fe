"""correlate(): Pearson, Spearman and the least-squares line per group, against numpy/scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.stats import correlation


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
