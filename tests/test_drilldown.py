"""matrix_detail: the per-vector arrays and spectra behind one table row, against numpy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from safetensors.torch import load_file

import dora_analysis as da
from dora_analysis import columns as C

pm = pytest.importorskip("tests.peft_models")
NAME = "model.layers.1.mlp.down_proj.weight"  # non-square (24 × 40)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_arrays_match_numpy_and_reduce_to_the_table_row(ckpts, axis):
    d = da.matrix_detail(ckpts["base"], ckpts["tuned"], NAME, axis=axis, intruder_k=5)
    w0 = load_file(str(ckpts["base"]))[NAME].double().numpy()
    wt = load_file(str(ckpts["tuned"]))[NAME].double().numpy()
    if axis == "in":
        w0, wt = w0.T, wt.T
    m0, mt = np.linalg.norm(w0, axis=1), np.linalg.norm(wt, axis=1)
    cos = (w0 * wt).sum(1) / (m0 * mt)
    np.testing.assert_allclose(d.m0, m0, rtol=1e-12)
    np.testing.assert_allclose(d.delta_m, mt - m0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d.one_minus_cos, 1 - cos, rtol=1e-6)
    delta = wt - w0
    radial = (delta * w0).sum(1) / m0
    np.testing.assert_allclose(d.tangential_share, 1 - radial**2 / (delta**2).sum(1), rtol=1e-6)
    np.testing.assert_allclose(d.sigma_delta, np.linalg.svd(delta, compute_uv=False), rtol=1e-10)
    np.testing.assert_allclose(d.sigma_base, np.linalg.svd(w0, compute_uv=False), rtol=1e-10)
    assert d.intruder_cos.shape == (5,) and (d.intruder_cos <= 1 + 1e-6).all()
    row = da.analyze(ckpts["base"], ckpts["tuned"], axis=axis, include=NAME).iloc[0]
    assert np.nanmean(np.abs(d.delta_m)) == pytest.approx(row[C.DELTA_M], rel=1e-12)
    assert np.nanmean(d.one_minus_cos) == pytest.approx(row[C.DELTA_D], rel=1e-12)
    assert list(d.vectors().columns) == ["vector", "m0", "mt", "delta_m", "one_minus_cos",
                                         "tangential_share"]


def test_lora_adapter_spectrum_from_its_factors(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = pm.make_case(tmp_path_factory.mktemp("drill"), "lora", *pm.CASES["lora"])
    name = "model.layers.0.mlp.down_proj.weight"
    d = da.matrix_detail(case.base, case.adapter, name)
    base, merged = load_file(str(case.base)), load_file(str(case.merged))
    want = np.linalg.svd((merged[name] - base[name]).double().numpy(), compute_uv=False)
    assert len(d.sigma_delta) == 4  # the adapter's rank: exactly its non-zero values
    np.testing.assert_allclose(d.sigma_delta, want[:4], rtol=1e-5)


def test_bad_requests_say_what_to_do(ckpts):
    with pytest.raises(da.DoraAnalysisError, match="no weight matrix of that name"):
        da.matrix_detail(ckpts["base"], ckpts["tuned"], "model.layers.9.nothing.weight")
    with pytest.raises(da.DoraAnalysisError, match="series of 3 checkpoints; name one"):
        da.matrix_detail(ckpts["base"], ckpts["series"], NAME)
    with pytest.raises(da.DoraAnalysisError, match="not an expert tensor"):
        da.matrix_detail(ckpts["base"], ckpts["tuned"], NAME, expert=1)
    with pytest.raises(da.DoraAnalysisError, match="axis must be"):
        da.matrix_detail(ckpts["base"], ckpts["tuned"], NAME, axis="rows")
