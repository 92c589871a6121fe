"""delta_m_radial / delta_m_sideways: ΔM as the radial and the sideways part would cause it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_analysis.decompose import PairAccumulator, compare
from dora_analysis.metrics.radial import radial_sideways


def sums_of(w0: np.ndarray, wt: np.ndarray, axis: str = "out"):
    acc = PairAccumulator(*w0.shape, (axis,))
    acc.add(torch.from_numpy(w0), torch.from_numpy(wt))
    return acc.sums()[axis]


def reference(w0: np.ndarray, wt: np.ndarray):
    """Per row in float64: a = ⟨Δw, ŵ0⟩ and √(ρ² + ‖t‖²) − ρ, t = Δw − a ŵ0."""
    rho = np.linalg.norm(w0, axis=1)
    unit = w0 / rho[:, None]
    d = wt - w0
    a = (d * unit).sum(1)
    t = np.linalg.norm(d - a[:, None] * unit, axis=1)
    return a, np.sqrt(rho**2 + t**2) - rho


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 1e-5])
def test_matches_a_float64_reference_on_non_square_weights(scale):
    g = np.random.default_rng(0)
    w0 = g.standard_normal((9, 23))
    wt = w0 + scale * g.standard_normal((9, 23))
    radial, sideways = (np.asarray(x) for x in radial_sideways(sums_of(w0, wt)))
    want_a, want_s = reference(w0, wt)
    np.testing.assert_allclose(radial, want_a, rtol=1e-6, atol=1e-12 * scale)
    np.testing.assert_allclose(sideways, want_s, rtol=1e-5, atol=1e-15)


def test_along_the_input_axis():
    g = np.random.default_rng(1)
    w0, wt = g.standard_normal((5, 13)), g.standard_normal((5, 13))
    radial, sideways = (np.asarray(x) for x in radial_sideways(sums_of(w0, wt, "in")))
    want_a, want_s = reference(w0.T, wt.T)
    np.testing.assert_allclose(radial, want_a, rtol=1e-9)
    np.testing.assert_allclose(sideways, want_s, rtol=1e-9)


def test_pure_rescale_is_all_radial_and_a_right_angle_step_all_sideways():
    w0 = np.array([[3.0, 4.0, 0.0], [0.0, 2.0, 0.0]])
    radial, sideways = radial_sideways(sums_of(w0, w0 * np.array([[1.5], [0.5]])))
    assert radial.tolist() == pytest.approx([2.5, -1.0]) and sideways.tolist() == [0.0, 0.0]
    step = np.array([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    radial, sideways = radial_sideways(sums_of(w0, w0 + step))
    assert radial.tolist() == pytest.approx([0.0, 0.0], abs=1e-15)
    assert sideways.tolist() == pytest.approx([np.sqrt(26) - 5, np.sqrt(8) - 2])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(2, 9), st.floats(1e-4, 0.3), st.integers(0, 2**31))
def test_the_two_parts_rebuild_delta_m_to_first_order(rows, cols, scale, seed):
    """Δm = √((ρ + a)² + t²) − ρ; for small steps ≈ a + (√(ρ² + t²) − ρ)."""
    g = np.random.default_rng(seed)
    w0 = g.standard_normal((rows, cols)) + 0.5
    wt = w0 + scale * g.standard_normal((rows, cols)) * np.linalg.norm(w0, axis=1,
                                                                        keepdims=True)
    radial, sideways = (np.asarray(x) for x in radial_sideways(sums_of(w0, wt)))
    dm = np.linalg.norm(wt, axis=1) - np.linalg.norm(w0, axis=1)
    rho = np.linalg.norm(w0, axis=1)
    assert (sideways >= 0).all()
    np.testing.assert_allclose(radial + sideways, dm, atol=4 * scale**2 * rho.max() * 3)
    assert compare(torch.from_numpy(w0), torch.from_numpy(wt)).delta_m == pytest.approx(
        np.abs(dm).mean(), rel=1e-9)
