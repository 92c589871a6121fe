"""Eqs. 2-4: hand-computed cases, a float64 reference, invariants, degenerate vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_analysis import compare, delta_direction, delta_magnitude, direction, magnitude
from dora_analysis.decompose import as_matrix

# 2x3 pair whose answers differ by axis (a wrong norm axis cannot pass):
#   rows:    (3,4,0)->(4,3,0): |m| 5->5, 1-cos = 1-24/25 = 0.04
#            (0,0,1)->(0,0,2): scaled, |m| 1->2, 1-cos = 0
#   columns: (3,0)->(4,0), (4,0)->(3,0), (0,1)->(0,2): all scaled, |m| changes 1, 1, 1
W0 = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
WT = torch.tensor([[4.0, 3.0, 0.0], [0.0, 0.0, 2.0]])


def reference(w0: np.ndarray, wt: np.ndarray, axis: str = "out") -> tuple[float, float]:
    """Independent float64 reference: ½|â − b̂|² per vector (a different formula from ours)."""
    a, b = np.asarray(w0, np.float64), np.asarray(wt, np.float64)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if axis == "in":
        a, b = a.T, b.T
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    diff = a[ok] / na[ok, None] - b[ok] / nb[ok, None]
    return float(np.mean(np.abs(nb - na)[ok])), float(np.mean(0.5 * (diff**2).sum(1)))


def assert_close(ours: float, ref: float, rel: float = 1e-5, abs_floor: float = 1e-12) -> None:
    tol = abs_floor if abs(ref) < 1e-7 else rel * abs(ref)
    assert abs(ours - ref) <= tol, (ours, ref)


class TestHandComputed:
    def test_magnitude_is_per_output_row_by_default(self):
        assert magnitude(W0).tolist() == [5.0, 1.0]
        assert magnitude(W0, axis="in").tolist() == [3.0, 4.0, 1.0]

    def test_direction_rows_are_unit(self):
        d = direction(W0)
        assert torch.allclose(d, torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=d.dtype))
        assert torch.allclose(d.norm(dim=1), torch.ones(2, dtype=d.dtype))

    def test_direction_of_zero_vector_is_zero(self):
        assert direction(torch.zeros(2, 3)).abs().sum() == 0

    def test_axis_out(self):
        s = compare(W0, WT)
        assert s.delta_d == pytest.approx(0.02, abs=1e-15)
        assert s.delta_m == pytest.approx(0.5, abs=1e-15)
        assert (s.n_vectors, s.zero_vectors, s.nonfinite_vectors) == (2, 0, 0)

    def test_axis_in(self):
        s = compare(W0, WT, axis="in")
        assert s.delta_d == pytest.approx(0.0, abs=1e-15)
        assert s.delta_m == pytest.approx(1.0, abs=1e-15)
        assert s.n_vectors == 3

    def test_row_scaled_by_two_has_no_direction_change(self):
        w0 = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
        s = compare(w0, 2 * w0)
        assert abs(s.delta_d) <= 1e-15
        assert s.delta_m == pytest.approx(float(magnitude(w0).mean()), rel=1e-12)

    def test_rotated_90_degrees_gives_one(self):
        w0 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
        wt = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
        s = compare(w0, wt)
        assert s.delta_d == pytest.approx(1.0, abs=1e-15)
        assert s.delta_m == 0.0

    def test_negated_gives_two(self):
        w0 = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
        assert delta_direction(w0, -w0) == pytest.approx(2.0, abs=1e-12)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("axis", ["out", "in"])
    def test_identical_is_exactly_zero(self, dtype, axis):
        w = (torch.randn(6, 11, generator=torch.Generator().manual_seed(2)) / 3).to(dtype)
        s = compare(w, w.clone(), axis=axis)
        assert s.delta_d == 0.0 and s.delta_m == 0.0
        assert math.copysign(1.0, s.delta_d) == 1.0  # not -0.0

    def test_functions_agree_with_compare(self):
        assert delta_magnitude(W0, WT) == compare(W0, WT).delta_m
        assert delta_direction(W0, WT, axis="in") == compare(W0, WT, axis="in").delta_d

    def test_conv_weight_is_viewed_out_by_in_times_kernel(self):
        g = torch.Generator().manual_seed(3)
        w0, wt = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
        assert as_matrix(w0).shape == (4, 12)
        ours = compare(w0, wt)
        ref = reference(w0.numpy(), wt.numpy())
        assert_close(ours.delta_m, ref[0])
        assert_close(ours.delta_d, ref[1])

    def test_transposed_storage_means_columns_are_output_channels(self):
        g = torch.Generator().manual_seed(4)
        w0, wt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
        normal = compare(w0, wt)
        conv1d = compare(w0.T.contiguous(), wt.T.contiguous(), transposed=True)
        assert conv1d.n_vectors == 5
        assert conv1d.delta_d == pytest.approx(normal.delta_d, rel=1e-12)
        assert conv1d.delta_m == pytest.approx(normal.delta_m, rel=1e-12)

    def test_inputs_are_not_modified(self):
        w0 = torch.randn(4, 6, dtype=torch.float64)
        wt = w0 + 0.1
        copies = w0.clone(), wt.clone()
        compare(w0, wt, block_elements=6)
        assert torch.equal(w0, copies[0]) and torch.equal(wt, copies[1])


class TestDegenerateVectors:
    def test_zero_base_row_is_excluded_and_counted(self):
        w0 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
        wt = torch.tensor([[1.0, 0.0, 0.0], [2.0, 4.0, 4.0]])
        s = compare(w0, wt)
        assert (s.zero_vectors, s.n_vectors) == (1, 2)
        assert s.delta_d == pytest.approx(0.0, abs=1e-15)
        assert s.delta_m == pytest.approx(3.0)

    def test_zero_tuned_row_is_excluded(self):
        s = compare(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
        assert s.zero_vectors == 1 and s.delta_d == pytest.approx(1.0)

    def test_all_zero_matrix_gives_nan_not_an_error(self):
        s = compare(torch.zeros(3, 4), torch.zeros(3, 4))
        assert s.zero_vectors == 3 and math.isnan(s.delta_d) and math.isnan(s.delta_m)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite_rows_are_excluded_and_counted(self, bad):
        w0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        wt = torch.tensor([[bad, 0.0, 0.0], [0.0, 0.0, 1.0]])
        s = compare(w0, wt)
        assert s.nonfinite_vectors == 1 and s.zero_vectors == 0
        assert s.delta_d == pytest.approx(1.0) and s.delta_m == 0.0
        s_in = compare(w0, wt, axis="in")  # the bad element poisons column 0 only
        assert s_in.nonfinite_vectors == 1


class TestFloat64Reference:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("axis", ["out", "in"])
    @pytest.mark.parametrize("scale", [1e-1, 1e-3])
    def test_agrees_with_reference(self, dtype, axis, scale):
        g = torch.Generator().manual_seed(5)
        w0 = (torch.randn(48, 80, generator=g) * 0.05).to(dtype)
        wt = (w0.double() + scale * 0.05 * torch.randn(48, 80, generator=g, dtype=torch.float64))
        wt = wt.to(dtype)
        ours = compare(w0, wt, axis=axis)
        ref = reference(w0.double().numpy(), wt.double().numpy(), axis)
        assert_close(ours.delta_m, ref[0])
        assert_close(ours.delta_d, ref[1])

    def test_full_fine_tuning_scale_delta_d_of_1e_6(self):
        """FT moves weights by ~1e-3 relative: ΔD ≈ 1e-6, where naive float32 loses digits."""
        g = torch.Generator().manual_seed(6)
        w0 = torch.randn(64, 4096, generator=g)
        wt = (w0.double() + 1.4e-3 * torch.randn(64, 4096, generator=g, dtype=torch.float64))
        wt = wt.float()
        ours = compare(w0, wt)
        ref = reference(w0.numpy(), wt.numpy())
        assert 5e-7 < ref[1] < 2e-6
        assert_close(ours.delta_d, ref[1], rel=1e-5)
        # The trap this module avoids: 1 - dot/(|a||b|) in float32.
        naive = float((1 - torch.nn.functional.cosine_similarity(w0, wt, dim=1)).mean())
        assert abs(naive - ref[1]) / ref[1] > 1e-3

    @pytest.mark.parametrize("axis", ["out", "in"])
    def test_block_size_does_not_change_the_result(self, axis):
        g = torch.Generator().manual_seed(7)
        w0, wt = torch.randn(37, 23, generator=g), torch.randn(37, 23, generator=g)
        whole = compare(w0, wt, axis=axis)
        for block in (1, 23, 50, 23 * 37):
            part = compare(w0, wt, axis=axis, block_elements=block)
            assert part.delta_d == pytest.approx(whole.delta_d, rel=1e-13)
            assert part.delta_m == pytest.approx(whole.delta_m, rel=1e-13)


# --- property tests -------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))
seeds = st.integers(0, 2**31 - 1)


def pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(
        *shape, generator=g, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, axis=st.sampled_from(["out", "in"]))
def test_matches_reference_and_is_bounded(shape, seed, axis):
    w0, wt = pair(shape, seed)
    s = compare(w0, wt, axis=axis)
    ref = reference(w0.numpy(), wt.numpy(), axis)
    assert 0.0 <= s.delta_d <= 2.0 and s.delta_m >= 0.0
    assert s.delta_m == pytest.approx(ref[0], rel=1e-9, abs=1e-12)
    assert s.delta_d == pytest.approx(ref[1], rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, axis=st.sampled_from(["out", "in"]))
def test_symmetric_in_base_and_tuned(shape, seed, axis):
    w0, wt = pair(shape, seed)
    a, b = compare(w0, wt, axis=axis), compare(wt, w0, axis=axis)
    assert a.delta_d == pytest.approx(b.delta_d, rel=1e-12, abs=1e-15)
    assert a.delta_m == pytest.approx(b.delta_m, rel=1e-12, abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, log_scales=st.lists(st.floats(-3, 3), min_size=9, max_size=9))
def test_direction_change_invariant_to_positive_row_scaling(shape, seed, log_scales):
    w0, wt = pair(shape, seed)
    scales = torch.tensor(log_scales[: shape[0]], dtype=torch.float64).exp()[:, None]
    before = compare(w0, wt).delta_d
    assert compare(w0, wt * scales).delta_d == pytest.approx(before, rel=1e-9, abs=1e-14)
    assert compare(w0 * scales, wt).delta_d == pytest.approx(before, rel=1e-9, abs=1e-14)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds)
def test_magnitude_change_invariant_to_norm_preserving_rotation(shape, seed):
    w0, wt = pair(shape, seed)
    q, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed + 1)))
    # wt @ q rotates every row: row norms (axis out) are kept, so ΔM is unchanged.
    assert compare(w0, wt @ q).delta_m == pytest.approx(compare(w0, wt).delta_m, rel=1e-9)
    # Rotating base and tuned together changes neither ΔM nor ΔD.
    both = compare(w0 @ q, wt @ q)
    assert both.delta_d == pytest.approx(compare(w0, wt).delta_d, rel=1e-9, abs=1e-14)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=seeds, axis=st.sampled_from(["out", "in"]))
def test_identical_is_exactly_zero_property(shape, seed, axis):
    w0, _ = pair(shape, seed)
    s = compare(w0, w0.clone(), axis=axis)
    assert s.delta_d == 0.0 and s.delta_m == 0.0


# --- the kernel's error analysis (module docstring), on stored dtypes -------------------------

STORED = [torch.bfloat16, torch.float16, torch.float32]


#: Spacing of stored values relative to the values (geometric middle of the binade's range).
RELATIVE_ULP = {torch.bfloat16: 2.0**-7.5, torch.float16: 2.0**-10.5, torch.float32: 2.0**-23.5}


def one_ulp_steps(w0: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """``w0`` with a random ``share`` of its non-zero elements moved by one unit in the last
    place, up or down at random: the smallest change its dtype can store, so that even bf16 can
    hold a ΔD of 1e-9 (a sign-coherent step would be mostly radial)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
    g = torch.Generator().manual_seed(seed)
    raw = w0.view(bits[w0.dtype]).clone()
    hit = (torch.rand(w0.shape, generator=g) < share) & (w0 != 0)
    sign = torch.randint(0, 2, w0.shape, generator=g, dtype=raw.dtype) * 2 - 1
    raw[hit] += sign[hit]
    return raw.view(w0.dtype)


def stored_pair(dtype: torch.dtype, target_dd: float, shape=(96, 1536), seed: int = 11):
    """A non-square pair in ``dtype`` whose ΔD is near ``target_dd`` (FT-like random steps)."""
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.02).to(dtype)
    step = (2 * target_dd) ** 0.5  # relative size of a random step with that ΔD
    if step >= RELATIVE_ULP[dtype]:  # the dtype can hold a dense random step of that size
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        return w0, (w0.double() * (1 + step * noise)).to(dtype)
    # below its resolution: one-ulp moves on a share of the elements, ΔD ≈ share · ulp² / 2
    return w0, one_ulp_steps(w0, step**2 / RELATIVE_ULP[dtype] ** 2, seed)


@pytest.mark.parametrize("dtype", STORED)
@pytest.mark.parametrize("target", [1e-6, 1e-9])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_fine_tuning_sized_changes_meet_the_contract(dtype, target, axis):
    """ΔD ~1e-6 (full fine-tuning) and ~1e-9 on non-square bf16/fp16/fp32: ≤ 1e-5 relative."""
    w0, wt = stored_pair(dtype, target)
    ref_dm, ref_dd = reference(w0.double().numpy(), wt.double().numpy(), axis)
    assert target / 5 < ref_dd < target * 5, ref_dd  # the regime the test is about
    for block in (1 << 10, 1 << 14, 1 << 17):
        ours = compare(w0, wt, axis=axis, block_elements=block)
        assert_close(ours.delta_d, ref_dd)
        assert_close(ours.delta_m, ref_dm)


@pytest.mark.parametrize("dtype", STORED)
def test_pure_rescaling_has_no_direction_change(dtype):
    """A purely radial step: ΔD is 0 to the absolute floor, ΔM exact to the contract."""
    g = torch.Generator().manual_seed(12)
    w0 = (torch.randn(40, 300, generator=g) * 0.05).to(dtype)
    wt = (w0.double() * 2).to(dtype)  # exact in every format: the direction cannot move
    s = compare(w0, wt)
    assert abs(s.delta_d) <= 1e-12
    assert_close(s.delta_m, reference(w0.double().numpy(), wt.double().numpy())[0])


@pytest.mark.parametrize("axis", ["out", "in"])
def test_per_row_sums_do_not_depend_on_the_block(axis):
    """Axis ``out`` sums whole rows in every block size: the bits never change."""
    w0, wt = stored_pair(torch.bfloat16, 1e-6, shape=(64, 700))
    results = {compare(w0, wt, axis=axis, block_elements=b) for b in (700, 5000, 1 << 16)}
    if axis == "out":
        assert len(results) == 1
    else:  # columns are summed block after block: equal to rounding
        first = next(iter(results))
        assert all(r.delta_d == pytest.approx(first.delta_d, rel=1e-13) for r in results)


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 90), seed=seeds,
       dtype=st.sampled_from(STORED), log_scale=st.floats(-5, -1),
       axis=st.sampled_from(["out", "in"]))
def test_stored_dtypes_match_an_independent_float64_reference(rows, cols, seed, dtype,
                                                              log_scale, axis):
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
    wt = (w0.double() + 10**log_scale * torch.randn(rows, cols, generator=g,
                                                    dtype=torch.float64)).to(dtype)
    s = compare(w0, wt, axis=axis, block_elements=max(1, rows * cols // 3))
    ref_dm, ref_dd = reference(w0.double().numpy(), wt.double().numpy(), axis)
    assert_close(s.delta_d, ref_dd)
    assert_close(s.delta_m, ref_dm)
    assert s.delta_d >= 0.0
