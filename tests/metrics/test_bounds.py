"""The certified fast paths of --spectrum and --intruders against dense float64 SVDs (numpy):
every bound holds on well- and ill-conditioned, square and non-square matrices; what is certified
is within the contract (1e-6 relative, the same energy rank, the same intruder count), and what
is not takes the dense path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.metrics import bounds, linalg
from dora_analysis.metrics import intruders as it
from dora_analysis.metrics import spectrum as sp

CPU = torch.device("cpu")
SHAPES = ((160, 96), (96, 160), (128, 128))


def reference(w0: np.ndarray, d: np.ndarray, r: int) -> dict[str, float]:
    """The spectral columns from numpy's dense float64 SVD of ΔW (the notebook way)."""
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    energy = s**2
    p = s[s > 0] / s.sum()
    return {
        sp.UPDATE_NORM: np.linalg.norm(d), sp.SIGMA_1: s[0], sp.STABLE_RANK: energy.sum() / s[0]**2,
        sp.EFFECTIVE_RANK: np.exp(-(p * np.log(p)).sum()),
        sp.ENERGY_RANK_90: int(np.argmax(np.cumsum(energy) >= 0.9 * energy.sum())) + 1,
        sp.AMPLIFICATION: np.linalg.norm(d) / np.linalg.norm(u[:, :r].T @ w0 @ vh[:r].T),
    }


def with_spectrum(shape, sigma, seed) -> np.ndarray:
    """A matrix of the given shape with singular values ``sigma`` and random singular vectors."""
    g = np.random.default_rng(seed)
    k = min(shape)
    u = np.linalg.qr(g.standard_normal((shape[0], k)))[0]
    v = np.linalg.qr(g.standard_normal((shape[1], k)))[0]
    return (u * sigma) @ v.T


def ft_update(shape, seed) -> np.ndarray:
    """Full fine-tuning's shape: a small dense update plus a stronger rank-8 part."""
    g = np.random.default_rng(seed)
    m, n = shape
    return (1e-3 * g.standard_normal(shape) / math.sqrt(n)
            + 1e-2 * g.standard_normal((m, 8)) @ g.standard_normal((8, n)) / n)


def base(shape, seed=99) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) / math.sqrt(shape[1])


def assert_within_contract(got, want):
    for col, value in want.items():
        if col == sp.ENERGY_RANK_90:
            assert got[col] == value
        else:
            assert got[col] == pytest.approx(value, rel=1e-6), col


@pytest.mark.parametrize("shape", SHAPES)
def test_full_fine_tuning_updates_are_certified_and_match_numpy(shape):
    w0, d = base(shape), ft_update(shape, seed=sum(shape))
    got = sp.gram_columns(d, w0, 16, CPU)
    assert got is not None  # the fast path is taken for the updates it is made for
    assert_within_contract(got, reference(w0, d, 16))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay", [1e-2, 1e-5, 1e-9, 1e-14])
def test_ill_conditioned_updates_are_certified_only_where_the_bounds_allow(shape, decay):
    w0 = base(shape)
    sigma = 1e-2 * np.geomspace(1, decay, min(shape))
    d = with_spectrum(shape, sigma, seed=int(-math.log10(decay)))
    got = sp.gram_columns(d, w0, 16, CPU)
    if decay >= 1e-5:
        assert got is not None
    if decay <= 1e-9:
        assert got is None  # the small σ matter to the effective rank: dense SVD
    if got is not None:
        assert_within_contract(got, reference(w0, d, 16))


def test_exactly_low_rank_updates_fall_back_to_the_dense_svd():
    g = np.random.default_rng(5)
    d = g.standard_normal((90, 4)) @ g.standard_normal((4, 70))
    assert sp.gram_columns(d, base((90, 70)), 4, CPU) is None  # σ₅… are rounding noise


def test_no_gap_after_sigma_r_means_no_amplification_certificate():
    sigma = np.ones(60)  # every top-r subspace is as good as another
    d = with_spectrum((80, 60), sigma, seed=3)
    assert sp.gram_columns(d, base((80, 60)), 16, CPU) is None
    sigma[:16] = 2.0
    d = with_spectrum((80, 60), sigma, seed=3)
    got = sp.gram_columns(d, base((80, 60)), 16, CPU)
    assert got is not None
    assert_within_contract(got, reference(base((80, 60)), d, 16))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(70, 140), cols=st.integers(70, 140), seed=st.integers(0, 2**31),
       decay=st.floats(1e-12, 1.0), low=st.integers(0, 10), r=st.integers(1, 20))
def test_certified_results_are_always_within_the_contract(rows, cols, seed, decay, low, r):
    g = np.random.default_rng(seed)
    k = min(rows, cols)
    sigma = np.geomspace(1.0, decay, k) * g.uniform(0.5, 1.0, k)
    sigma[:low] *= 10.0
    d = with_spectrum((rows, cols), np.sort(sigma)[::-1], seed)
    w0 = g.standard_normal((rows, cols))
    got = sp.gram_columns(d, w0, r, CPU)
    if got is not None:
        assert_within_contract(got, reference(w0, d, r))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay", [0.5, 1e-4, 1e-9])
def test_the_eigenvalue_and_effective_rank_bounds_hold(shape, decay):
    d = with_spectrum(shape, np.geomspace(3.0, 3.0 * decay, min(shape)), seed=7)
    g = linalg.gram_spectrum(d, 4, CPU)
    exact = np.linalg.svd(d, compute_uv=False)
    assert np.all(np.abs(g.eigenvalues - exact**2) <= g.error)
    assert abs(g.frobenius_sq - np.sum(d * d)) <= bounds.rounding(max(shape)) * g.frobenius_sq
    lo, hi = bounds.sigma_intervals(g.eigenvalues, g.error)
    assert np.all((lo <= exact) & (exact <= hi))
    sigma = np.sqrt(np.maximum(g.eigenvalues, 0))

    def erank(s):
        p = s[s > 0] / s.sum()
        return math.exp(-(p * np.log(p)).sum())

    actual = abs(erank(sigma) - erank(exact)) / erank(exact)
    assert actual <= bounds.effective_rank_error(sigma, lo, hi)
    # The top eigenvectors are the right singular vectors of the tall orientation.
    x = d.T if g.transposed else d
    v = np.linalg.svd(x, full_matrices=False)[2][:4].T
    np.testing.assert_allclose(np.abs(np.sum(g.vectors * v, axis=0)), 1.0, atol=1e-8)


def test_energy_rank_is_refused_on_the_line():
    values = np.ones(10)  # nine of ten equal values hold exactly 90 %
    assert bounds.energy_rank(values, 10.0, 0.9, 0.0) == 9
    assert bounds.energy_rank(values, 10.0, 0.9, 1e-9) is None
    assert bounds.energy_rank(np.array([16.0, 9.0]), 25.0, 0.9, 1e-9) == 2


def test_clusters_group_close_values_and_bound_each():
    groups = bounds.clusters(np.array([5.0, 4.0, 4.0 - 1e-12, 1.0, 0.0]), delta=1e-14)
    assert groups.starts.tolist() == [0, 1, 3, 4]
    assert groups.sizes(5).tolist() == [1, 2, 1, 1]
    np.testing.assert_allclose(groups.angles, [1e-14 / (1 - 1e-14), 1e-14 / (1 - 1e-14),
                                               1e-14 / (1 - 1e-14), 1e-14 / (1 - 1e-14)])


def test_intruder_status_decides_only_outside_the_margins():
    # Basis e1, e2, e3 (singletons); tested vectors: one along e1, one spread out, one at ε.
    groups = bounds.Clusters(np.array([0, 1, 2]), np.zeros(3))
    coefficients = np.array([[1.0, 0.3, 0.5], [0.0, 0.3, 0.5], [0.0, math.sqrt(0.82), 0.7]])
    status = bounds.intruder_status(coefficients, groups, np.full((3, 3), 1e-3), eps=0.5)
    assert status.tolist() == [0, 0, 0]
    status = bounds.intruder_status(coefficients, groups, np.full((3, 3), 1e-3), eps=0.95)
    assert status.tolist() == [0, 1, 1]
    status = bounds.intruder_status(coefficients, groups, np.full((3, 3), 1e-3), eps=0.7)
    assert status.tolist() == [0, 0, -1]  # 0.7 ± 1e-3 straddles ε


@pytest.mark.parametrize("shape", [(150, 100), (100, 150), (110, 110), (60, 40)])
@pytest.mark.parametrize("decay", [0.5, 1e-3, 1e-8])
def test_the_base_basis_bounds_hold_for_every_cluster(shape, decay):
    sigma = np.geomspace(2.0, 2.0 * decay, min(shape))
    sigma[10:13] = sigma[10]  # a cluster of three equal values
    w0 = with_spectrum(shape, sigma, seed=11)
    basis = it.compute_basis(w0, CPU)
    assert basis.z.dtype == np.float32 and (len(basis.tau) > 0) == (min(shape) >= 64)
    u = np.linalg.svd(w0, full_matrices=False)[0]
    u_hat = basis.coefficients(np.eye(shape[0]), w0).T  # the basis itself, column by column
    assert u_hat.shape == u.shape
    ends = np.append(basis.starts[1:], u.shape[1])
    for start, end, margin in zip(basis.starts, ends, basis.margins, strict=True):
        got = u_hat[:, start:end]
        exact = u[:, start:end]
        # sin of the largest angle between the two subspaces
        sine = np.linalg.norm(got - exact @ (exact.T @ got), 2)
        assert sine <= margin
    sizes = np.diff(np.append(basis.starts, u.shape[1]))
    assert 3 in sizes  # the equal values are one cluster
    if decay >= 1e-3:  # tight enough to decide every test not within 1e-2 of ε (float32
        # reflectors: ≤ 6n·u₃₂); a tall W0's left vectors W0·v/σ pay σ₁/σ (1e3 here)
        assert basis.margins.max() < (1e-4 if shape[0] <= shape[1] else 1e-1)


def test_an_undecided_vector_is_counted_from_the_dense_svds(tmp_path, monkeypatch):
    """A tested vector whose |cos| sits on ε cannot be certified: the dense path counts."""
    g = np.random.default_rng(8)
    w0 = g.standard_normal((70, 50))
    wt = w0 + 3 * np.outer(g.standard_normal(70), g.standard_normal(50))
    save_file({"m.weight": torch.from_numpy(w0)}, str(tmp_path / "b.safetensors"))
    save_file({"m.weight": torch.from_numpy(wt)}, str(tmp_path / "t.safetensors"))
    u0 = np.linalg.svd(w0)[0]
    ut = np.linalg.svd(wt)[0][:, :10]
    eps = float(np.abs(ut.T @ u0).max(axis=1)[0])  # the first tested vector sits exactly on ε
    calls = []
    real = it.dense_count
    monkeypatch.setattr(it, "dense_count", lambda *a: calls.append(1) or real(*a))
    table = da.analyze(tmp_path / "b.safetensors", tmp_path / "t.safetensors", intruders=True,
                       intruder_eps=eps, svd_cache="none")
    assert calls == [1]
    assert table[it.INTRUDERS].item() == int((np.abs(ut.T @ u0).max(axis=1) < eps).sum())
