"""tangential_fraction: the share of each vector's change orthogonal to its base vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_analysis.decompose import PairAccumulator
from dora_analysis.metrics.tangential import tangential_share


def sums_of(w0: torch.Tensor, wt: torch.Tensor, axis: str = "out"):
    acc = PairAccumulator(*w0.shape, (axis,))
    acc.add(w0, wt)
    return acc.sums()[axis]


def reference(w0: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """Per row, in float64: the part of Δw orthogonal to w0, squared, over ‖Δw‖²."""
    d = wt - w0
    unit = w0 / np.linalg.norm(w0, axis=1, keepdims=True)
    radial = (d * unit).sum(1, keepdims=True) * unit
    return np.square(d - radial).sum(1) / np.square(d).sum(1)


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 1e-5])
def test_matches_a_float64_reference_on_non_square_weights(scale):
    g = np.random.default_rng(0)
    w0 = g.standard_normal((7, 19))
    wt = w0 + scale * g.standard_normal((7, 19))
    got = np.asarray(tangential_share(sums_of(torch.from_numpy(w0), torch.from_numpy(wt))))
    np.testing.assert_allclose(got, reference(w0, wt), rtol=1e-6, atol=1e-9)


def test_along_the_input_axis_it_splits_columns():
    g = np.random.default_rng(1)
    w0, wt = g.standard_normal((6, 11)), g.standard_normal((6, 11))
    got = np.asarray(tangential_share(sums_of(torch.from_numpy(w0), torch.from_numpy(wt), "in")))
    np.testing.assert_allclose(got, reference(w0.T, wt.T), rtol=1e-9)


def test_a_pure_rescale_is_radial_and_a_sideways_step_tangential():
    w0 = torch.tensor([[3.0, 4.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    scaled = w0 * torch.tensor([[1.5], [0.5]], dtype=torch.float64)
    assert tangential_share(sums_of(w0, scaled)).tolist() == [0.0, 0.0]
    sideways = w0 + torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert tangential_share(sums_of(w0, sideways)).tolist() == pytest.approx([1.0, 1.0])


def test_unchanged_and_zero_vectors_have_no_share():
    w0 = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    wt = torch.tensor([[1.0, 2.0], [1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    share = tangential_share(sums_of(w0, wt))
    assert np.isnan(share[:2]).all() and 0 < share[2] < 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.floats(1e-4, 10.0), st.integers(0, 2**31))
def test_share_is_a_fraction_equal_to_the_reference(rows, cols, scale, seed):
    g = np.random.default_rng(seed)
    w0 = g.standard_normal((rows, cols)) + 0.1
    wt = w0 + scale * g.standard_normal((rows, cols))
    got = np.asarray(tangential_share(sums_of(torch.from_numpy(w0), torch.from_numpy(wt))))
    assert ((got >= 0) & (got <= 1)).all()
    np.testing.assert_allclose(got, reference(w0, wt), rtol=1e-5, atol=1e-8)
