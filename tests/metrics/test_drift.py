"""--drift: spectral drift and subspace rotation against a float64 numpy reference on non-square
bf16 and fp32 matrices (tall and wide), within the accuracy contract of the Gram-based method;
near-tied singular values, zero matrices and k ≥ rank (the dense fallback); their invariants;
k clamped with a note."""

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
from dora_analysis.metrics import drift
from dora_analysis.metrics.bounds import norm_ratio_error, overlap_error
from dora_analysis.metrics.drift import spectral_drift, weight_drift


def reference(w0: np.ndarray, wt: np.ndarray, k: int) -> dict[str, float]:
    """Straight from the definitions, with numpy's full SVD."""
    u0, s0, v0h = np.linalg.svd(w0)
    ut, st_, vth = np.linalg.svd(wt)
    return {"spectral_drift": np.linalg.norm(st_ - s0) / np.linalg.norm(s0),
            "rotation_left": 1 - np.linalg.norm(u0[:, :k].T @ ut[:, :k]) ** 2 / k,
            "rotation_right": 1 - np.linalg.norm(v0h[:k] @ vth[:k].T) ** 2 / k}


def assert_within_contract(got: dict[str, float], expected: dict[str, float]) -> None:
    """The module's contract: spectral drift to 1e-6 relative or 1e-7 absolute, rotations to
    1e-6 absolute."""
    want = expected["spectral_drift"]
    assert abs(got["spectral_drift"] - want) <= max(drift.DRIFT_RTOL * want, drift.DRIFT_ATOL)
    for side in ("rotation_left", "rotation_right"):
        assert got[side] == pytest.approx(expected[side], abs=drift.ROTATION_ATOL), side


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
    assert_within_contract(got, expected)
    alone = spectral_drift(w0.double().numpy(), wt.double().numpy())
    assert abs(alone - expected["spectral_drift"]) <= max(
        1e-6 * expected["spectral_drift"], 1e-7)


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
    assert_within_contract(got, reference(w0.double().numpy(), wt.double().numpy(), 6))


def test_the_table_columns_and_the_cli_note(tmp_path, capsys):
    w0, wt = pair((12, 40), torch.bfloat16, seed=4, step=0.02)
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({name: w0}, str(tmp_path / "b.safetensors"))
    save_file({name: wt}, str(tmp_path / "t.safetensors"))
    table = da.analyze(tmp_path / "b.safetensors", tmp_path / "t.safetensors", drift=True,
                       drift_k=3)
    expected = reference(w0.double().numpy(), wt.double().numpy(), 3)
    assert_within_contract(table.iloc[0][list(expected)].astype(float).to_dict(), expected)
    from dora_analysis.cli import main

    assert main([str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--drift",
                 "--drift-k", "50"]) == 0
    assert f"note: --drift-k, {name}: k = 50 is more than min(out, in) = 12; using k = 12" \
        in capsys.readouterr().err


def counting_dense(monkeypatch) -> list[int]:
    """Record the k of every dense fallback (0: values only)."""
    calls: list[int] = []
    dense = drift.dense_decomposition

    def spy(w, k, device):
        calls.append(k)
        return dense(w, k, device)

    monkeypatch.setattr(drift, "dense_decomposition", spy)
    return calls


def spectrum_pair(shape, sigma0, seed, step):
    """W0 = U·diag(sigma0)·Vᵀ with random orthonormal U, V, and Wt = W0 + step·noise."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    u = np.linalg.qr(rng.standard_normal((rows, len(sigma0))))[0]
    v = np.linalg.qr(rng.standard_normal((cols, len(sigma0))))[0]
    w0 = (u * sigma0) @ v.T
    return w0, w0 + step * rng.standard_normal(shape)


@pytest.mark.parametrize("shape", [(300, 180), (180, 300)])
def test_a_well_separated_pair_is_certified_without_a_dense_svd(shape, monkeypatch):
    n = min(shape)
    w0, wt = spectrum_pair(shape, np.linspace(3.0, 0.5, n) ** 2, seed=n, step=1e-3)
    calls = counting_dense(monkeypatch)
    got = weight_drift(w0, wt, 8)
    assert calls == []  # every part from the Gram matrices
    assert_within_contract(got, reference(w0, wt, 8))
    assert got["spectral_drift"] > 1e-4 and got["rotation_left"] > 1e-8


@pytest.mark.parametrize("shape", [(120, 70), (70, 120)])
def test_near_tied_singular_values_at_the_k_boundary_fall_back_to_a_dense_svd(shape,
                                                                               monkeypatch):
    sigma = np.linspace(2.0, 0.1, min(shape))
    sigma[4] = sigma[3] * (1 - 1e-12)  # σ₄ ≈ σ₅: the top-4 subspace is barely determined
    w0, wt = spectrum_pair(shape, sigma, seed=7, step=0.0)
    wt = wt.copy()
    wt[:, 0] += 0.05  # a real move, well above the near-tie
    calls = counting_dense(monkeypatch)
    got = weight_drift(w0, wt, 4)
    assert 4 in calls  # W0's subspace: no certificate, a dense SVD with vectors
    ref = reference(w0, wt, 4)
    assert abs(got["spectral_drift"] - ref["spectral_drift"]) <= 1e-6 * ref["spectral_drift"]
    # the near-tie makes U0's 4th vector sensitive (angle ~ ε/1e-12): the references of two
    # LAPACKs agree to ~1e-4 only, and so do we
    assert got["rotation_left"] == pytest.approx(ref["rotation_left"], abs=1e-3)


def test_ties_inside_the_top_k_are_certified(monkeypatch):
    sigma = np.linspace(2.0, 0.1, 60)
    sigma[1] = sigma[0]  # σ₁ = σ₂ exactly: their plane is determined, the top-4 too
    w0, wt = spectrum_pair((90, 60), sigma, seed=8, step=1e-3)
    calls = counting_dense(monkeypatch)
    got = weight_drift(w0, wt, 4)
    assert 4 not in calls
    assert_within_contract(got, reference(w0, wt, 4))


def test_zero_matrices():
    zero = np.zeros((30, 50))
    w = np.random.default_rng(0).standard_normal((30, 50))
    both = weight_drift(zero, zero, 4)
    assert math.isnan(both["spectral_drift"])  # ‖σ(W0)‖ = 0
    assert both["rotation_left"] == 0.0 and both["rotation_right"] == 0.0
    gone = weight_drift(w, zero, 4)
    assert gone["spectral_drift"] == pytest.approx(1.0, rel=1e-12)
    assert 0.0 <= gone["rotation_left"] <= 1.0  # Wt = 0: any subspace is as good as another
    assert math.isnan(spectral_drift(zero, w))


@pytest.mark.parametrize("shape", [(80, 50), (50, 80)])
def test_k_at_and_beyond_the_rank(shape, monkeypatch):
    rng = np.random.default_rng(9)
    w0 = rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1]))  # rank 3
    wt = w0 + 1e-2 * rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1]))
    assert_within_contract(weight_drift(w0, wt, 3), reference(w0, wt, 3))  # k = rank
    calls = counting_dense(monkeypatch)
    beyond = weight_drift(w0, wt, 5)  # σ₄ = σ₅ = σ₆ = 0: the top 5 are not determined
    assert 5 in calls
    ref = reference(w0, wt, 5)
    assert abs(beyond["spectral_drift"] - ref["spectral_drift"]) <= 1e-6 * ref["spectral_drift"]
    assert 0.0 <= beyond["rotation_left"] <= 1.0 and 0.0 <= beyond["rotation_right"] <= 1.0
    # k = min(out, in) of a full-rank matrix: the smaller side's space is all of it
    full0, fullt = spectrum_pair(shape, np.linspace(2.0, 0.5, min(shape)), seed=10, step=0.01)
    got = weight_drift(full0, fullt, min(shape))
    assert_within_contract(got, reference(full0, fullt, min(shape)))
    smaller = "rotation_right" if shape[0] > shape[1] else "rotation_left"
    assert got[smaller] == pytest.approx(0.0, abs=1e-6)


def test_a_bf16_pair_of_llm_like_shape_within_the_contract():
    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(256, 96, generator=g) / 16
    wt = (w0 + 1e-3 * torch.randn(256, 96, generator=g)).to(torch.bfloat16)
    w0 = w0.to(torch.bfloat16)
    got = weight_drift(w0, wt, 16)
    assert_within_contract(got, reference(w0.double().numpy(), wt.double().numpy(), 16))
    assert_within_contract(weight_drift(w0.T, wt.T, 16),
                           reference(w0.T.double().numpy(), wt.T.double().numpy(), 16))


@settings(max_examples=30, deadline=None)
@given(num=st.floats(0, 10), den=st.floats(0.1, 10), a=st.floats(0, 0.05), b=st.floats(0, 0.05),
       sa=st.sampled_from([-1, 1]), sb=st.sampled_from([-1, 1]))
def test_the_ratio_bound_holds_at_the_corners(num, den, a, b, sa, sb):
    bound = norm_ratio_error(num, a, den, b)
    exact = max(num + sa * a, 0.0) / (den + sb * b)
    assert abs(exact - num / den) <= bound * (1 + 1e-12) + 1e-15


def test_the_overlap_bound_holds_for_known_angles():
    rng = np.random.default_rng(12)
    m, k = 50, 4
    a = np.linalg.qr(rng.standard_normal((m, k)))[0]
    b = np.linalg.qr(rng.standard_normal((m, k)))[0]
    for eps in (1e-8, 1e-5, 1e-3):
        moved = np.linalg.qr(a + eps * rng.standard_normal((m, k)))[0]
        sin = np.linalg.norm(moved - a @ (a.T @ moved))  # ‖sinΘ‖_F of the two subspaces
        change = abs(np.square(moved.T @ b).sum() - np.square(a.T @ b).sum()) / k
        assert change <= overlap_error(sin, 0.0, k, m)
    assert overlap_error(math.inf, 0.0, k, m) == math.inf
