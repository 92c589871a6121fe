"""--drift: spectral drift and subspace rotation against a float64 numpy reference on non-square
bf16 and fp32 matrices, their invariants, and k clamped with a note."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.metrics.drift import spectral_drift, weight_drift


def reference(w0: np.ndarray, wt: np.ndarray, k: int) -> dict[str, float]:
    """Straight from the definitions, with numpy's full SVD."""
    u0, s0, v0h = np.linalg.svd(w0)
    ut, st_, vth = np.linalg.svd(wt)
    return {"spectral_drift": np.linalg.norm(st_ - s0) / np.linalg.norm(s0),
            "rotation_left": 1 - np.linalg.norm(u0[:, :k].T @ ut[:, :k]) ** 2 / k,
            "rotation_right": 1 - np.linalg.norm(v0h[:k] @ vth[:k].T) ** 2 / k}


def pair(shape, dtype, seed, step):
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum: the top subspaces are well separated, so they are defined
    rows, cols = shape
    u = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))[0]
    s = 0.8 ** torch.arange(min(shape), dtype=torch.float64)
    w0 = (u[:, : len(s)] * s) @ v[:, : len(s)].T
    wt = w0 + step * torch.randn(shape, generator=g, dtype=torch.float64)
    return w0.to(dtype), wt.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(70, 90), (120, 66), (9, 30)])
def test_drift_against_a_float64_reference(dtype, shape):
    w0, wt = pair(shape, dtype, seed=shape[0], step=0.01)
    k = 4
    expected = reference(w0.double().numpy(), wt.double().numpy(), k)
    got = weight_drift(w0, wt, k)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-13)
    assert spectral_drift(w0.double().numpy(), wt.double().numpy()) == pytest.approx(
        expected["spectral_drift"], rel=1e-12)


def test_invariants():
    w0, _ = pair((40, 25), torch.float64, seed=1, step=0.0)
    same = weight_drift(w0, w0.clone(), 5)
    assert same["spectral_drift"] == 0.0
    assert same["rotation_left"] == pytest.approx(0.0, abs=1e-12)
    assert same["rotation_right"] == pytest.approx(0.0, abs=1e-12)
    # a pure rescale moves the spectrum, never the subspaces
    scaled = weight_drift(w0, 1.5 * w0, 5)
    assert scaled["spectral_drift"] == pytest.approx(0.5, rel=1e-12)
    assert scaled["rotation_left"] == pytest.approx(0.0, abs=1e-12)
    # orthogonal transforms on either side keep the spectrum, rotate one side only
    q = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(2),
                                    dtype=torch.float64))[0]
    rotated = weight_drift(w0, q @ w0, 5)
    assert rotated["spectral_drift"] == pytest.approx(0.0, abs=1e-13)
    assert rotated["rotation_right"] == pytest.approx(0.0, abs=1e-10)
    assert rotated["rotation_left"] > 0.5
    bad = w0.clone()
    bad[0, 0] = math.nan
    assert all(math.isnan(v) for v in weight_drift(w0, bad, 3).values())


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(2, 30), cols=st.integers(2, 30), k=st.integers(1, 40),
       seed=st.integers(0, 2**31))
def test_rotations_lie_in_zero_one(rows, cols, k, seed):
    w0, wt = pair((rows, cols), torch.float64, seed, step=0.5)
    got = weight_drift(w0, wt, k)
    assert 0.0 <= got["rotation_left"] <= 1.0 and 0.0 <= got["rotation_right"] <= 1.0
    assert got["spectral_drift"] >= 0.0


def test_k_beyond_the_matrix_is_clamped_with_a_note(caplog):
    w0, wt = pair((6, 20), torch.float32, seed=3, step=0.1)
    with caplog.at_level(logging.INFO, logger="dora_analysis"):
        got = weight_drift(w0, wt, 16, name="layer")
    assert "layer: k = 16 is more than min(out, in) = 6; using k = 6" in caplog.text
    assert got["rotation_left"] == pytest.approx(0.0, abs=1e-12)  # all of R^6: no rotation
    assert got == pytest.approx(weight_drift(w0, wt, 6))


def test_the_table_columns_and_the_cli_note(tmp_path, capsys):
    w0, wt = pair((12, 40), torch.bfloat16, seed=4, step=0.02)
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({name: w0}, str(tmp_path / "b.safetensors"))
    save_file({name: wt}, str(tmp_path / "t.safetensors"))
    table = da.analyze(tmp_path / "b.safetensors", tmp_path / "t.safetensors", drift=True,
                       drift_k=3)
    expected = reference(w0.double().numpy(), wt.double().numpy(), 3)
    assert table.iloc[0][list(expected)].astype(float).to_dict() == pytest.approx(expected,
                                                                                  rel=1e-9)
    from dora_analysis.cli import main

    assert main([str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--drift",
                 "--drift-k", "50"]) == 0
    assert f"note: --drift-k, {name}: k = 50 is more than min(out, in) = 12; using k = 12" \
        in capsys.readouterr().err
