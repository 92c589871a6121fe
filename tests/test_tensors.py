"""Every metric on in-memory matrices (dora_analysis.tensors): the same numbers as the table of
the same matrices saved to files, factors in closed form equal to their merged weight, and the
definitions against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import metrics

NAME = "model.layers.0.mlp.down_proj.weight"
PROVENANCE = {"checkpoint", "method", "step", "name", "layer", "module", "expert", "dtype",
              "tuned_name", "ref", "base", "rows", "cols", "axis"}


def matrices(dtype=torch.bfloat16, shape=(28, 45), seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=g).to(dtype)
    wt = (w0.double() + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return w0, wt


def table_row(tmp_path, w0, wt, **settings):
    save_file({NAME: w0.contiguous()}, str(tmp_path / "b.safetensors"))
    save_file({NAME: wt.contiguous()}, str(tmp_path / "t.safetensors"))
    return da.analyze(tmp_path / "b.safetensors", tmp_path / "t.safetensors", **settings)


SETTINGS = {"spectrum": True, "intruders": True, "intruder_k": 4, "svd_cache": "none",
            "sparsity": True, "drift": True, "drift_k": 5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_measure_gives_the_tables_numbers(tmp_path, dtype):
    w0, wt = matrices(dtype)
    table = table_row(tmp_path, w0, wt, axis="both", **SETTINGS)
    got = metrics.measure(w0, wt, axis="both", **SETTINGS)
    for axis in ("out", "in"):
        row = table[table["axis"] == axis].iloc[0]
        for column, value in got[axis].items():
            if column in PROVENANCE:
                continue
            expected = row[column]
            if isinstance(value, str):  # warnings
                assert value == expected, column
            elif isinstance(value, float) and math.isnan(value):
                assert pd_isna(expected), column
            else:
                assert value == pytest.approx(expected, rel=1e-12, abs=1e-15), column


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_numpy_input_is_read_as_its_own_dtype():
    w0, wt = matrices(torch.float32)
    from_numpy = metrics.measure(w0.numpy(), wt.numpy(), sparsity=True)
    from_torch = metrics.measure(w0, wt, sparsity=True)
    assert from_numpy == from_torch
    assert from_numpy["unchanged_fraction"] == metrics.update_sparsity(w0, wt)[
        "unchanged_fraction"]


def test_factors_take_the_closed_forms_and_equal_the_merged_weight():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(30, 52, generator=g, dtype=torch.float64)
    b, a = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(
        3, 52, generator=g, dtype=torch.float64)
    merged = w0 + 0.25 * b @ a
    from_factors = metrics.update_spectrum(w0, lora=(b, a, 0.25))
    dense = metrics.update_spectrum(w0, merged)
    assert from_factors == pytest.approx(dense, rel=1e-9)
    assert from_factors["stable_rank"] <= 3 + 1e-9
    for fn in (metrics.tangential_fraction, metrics.delta_m_split):
        assert fn(w0, lora=(b, a, 0.25)) == pytest.approx(fn(w0, merged), rel=1e-9)
    assert metrics.count_intruders(w0, lora=(b, a, 0.25), k=3) == metrics.count_intruders(
        w0, merged, k=3)


def test_tangential_fraction_and_the_split_on_golden_cases():
    w0 = torch.randn(9, 14, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert metrics.tangential_fraction(w0, 1.5 * w0) == pytest.approx(0.0, abs=1e-12)
    # each row turned by 90° within the plane of w0 and an orthogonal unit vector, same norm
    ortho = torch.randn(9, 14, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ortho -= (ortho * w0).sum(1, keepdim=True) / (w0 * w0).sum(1, keepdim=True) * w0
    ortho *= w0.norm(dim=1, keepdim=True) / ortho.norm(dim=1, keepdim=True)
    step = ortho - w0  # wt = ortho: Δw has radial part −‖w0‖ and tangential ‖w0‖
    assert metrics.tangential_fraction(w0, w0 + step) == pytest.approx(0.5, rel=1e-12)
    split = metrics.delta_m_split(w0, 1.5 * w0)
    assert split["delta_m_radial"] == pytest.approx(float(0.5 * w0.norm(dim=1).mean()))
    assert split["delta_m_sideways"] == pytest.approx(0.0, abs=1e-12)


def test_health_warnings_from_arrays_and_factors():
    w0, wt = matrices(torch.float32, seed=4)
    assert metrics.health_warnings(w0, w0.clone()) == ["unchanged"]
    assert metrics.health_warnings(w0, wt) == []
    assert "nonfinite" in metrics.health_warnings(w0, torch.full_like(w0, math.nan))
    b, a = torch.zeros(28, 2), torch.randn(2, 45)
    assert metrics.health_warnings(w0, lora=(b, a, 1.0)) == ["lora_B_zero", "unchanged"]
    norms = w0.double().norm(dim=1)
    assert "magnitude_frozen" in metrics.health_warnings(w0, lora=(torch.randn(28, 2), a, 1.0),
                                                         magnitude=norms)


def test_intruders_against_the_definition():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(40, 70, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    spike = torch.randn(40, 1, generator=g, dtype=torch.float64)
    wt = w0 + 30 * spike @ torch.randn(1, 70, generator=g, dtype=torch.float64) / 70**0.5
    ut = torch.linalg.svd(wt, full_matrices=False)[0][:, :5]
    expected = int(((ut.T @ u).abs().amax(dim=1) < 0.5).sum())
    assert metrics.count_intruders(w0, wt, k=5) == expected
    assert metrics.count_intruders(w0, w0.clone(), k=5) == 0


def test_bad_input_says_what_is_wrong():
    w0, wt = matrices()
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.measure(w0, wt[:, :-1])
    with pytest.raises(ValueError, match="give Wt, or the update"):
        metrics.measure(w0)
    with pytest.raises(ValueError, match="W0 must be a matrix"):
        metrics.measure(np.zeros(5), np.zeros(5))
