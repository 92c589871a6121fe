"""The fused kernel (dora_analysis/kernel.py): exact widening of every stored value, sums against
an independent float64 reference, non-finite propagation, determinism, and its cache folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dora_analysis.kernel import BF16, F16, F32, F64, accumulate, widen

ROOT = Path(__file__).resolve().parents[1]
ALL_BITS = np.arange(1 << 16, dtype=np.uint16)


@numba.njit
def widened(values, code):
    """Each element through the kernel's own widening (compiled like the kernel)."""
    out = np.empty(values.size)
    for i in range(values.size):
        out[i] = widen(values[i], code)
    return out


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """The exact float64 values of bfloat16 bit patterns: the upper half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equal as float64, every NaN counting as equal (a payload is not a value)."""
    nan = np.isnan(a) & np.isnan(b)
    return bool(np.all(nan | (a.view(np.uint64) == b.view(np.uint64))))


@pytest.mark.parametrize(("code", "reference"), [
    (F16, lambda bits: bits.view(np.float16).astype(np.float64)),
    (BF16, bf16_values),
])
def test_every_16_bit_pattern_is_widened_exactly(code, reference):
    """All 65 536 patterns: normals, subnormals, ±0 (sign kept), ±inf, every NaN."""
    got, want = widened(ALL_BITS, code), reference(ALL_BITS)
    assert same_values(got, want)
    assert np.isnan(got).sum() == np.isnan(want).sum() > 0
    assert np.signbit(got[0x8000]) and got[0x8000] == 0.0  # -0.0


def test_float16_subnormals_and_extremes_by_hand():
    bits = np.array([0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x7E00], dtype=np.uint16)
    got = widened(bits, F16)
    assert got[:4].tolist() == [2.0**-24, 1023 * 2.0**-24, 2.0**-14, 65504.0]
    assert got[4] == np.inf and got[5] == -np.inf and np.isnan(got[6])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_floats_are_widened_as_themselves(dtype):
    values = np.array([0.0, -0.0, 1e-45, 3.4e38, np.inf, -np.inf, np.nan], dtype=dtype)
    assert same_values(widened(values, F32 if dtype == np.float32 else F64),
                       values.astype(np.float64))


def reference_sums(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 sums per row and per column: (3, rows), (3, cols)."""
    d = b - a
    planes = np.stack([a * a, b * b, d * d])
    return planes.sum(2), planes.sum(1)


def as_stored(values: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``values`` rounded to a stored dtype: (the array the kernel reads, its exact values)."""
    if kind == "bfloat16":
        bits = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncation
        return bits, bf16_values(bits)
    stored = values.astype(kind)
    return stored, stored.astype(np.float64)


KINDS = ["bfloat16", "float16", "float32", "float64"]


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 37), cols=st.integers(1, 70), seed=st.integers(0, 2**32 - 1),
       kinds=st.tuples(st.sampled_from(KINDS), st.sampled_from(KINDS)),
       log_step=st.floats(-7, 0))
def test_sums_match_a_float64_reference(rows, cols, seed, kinds, log_step):
    """Non-square blocks in every dtype, mixed: row and column sums to ≤ 1e-13 relative."""
    g = np.random.default_rng(seed)
    w0 = g.standard_normal((rows, cols)) * 0.05
    wt = w0 * (1 + 10**log_step * g.standard_normal((rows, cols)))
    (a, x), (b, y) = as_stored(w0, kinds[0]), as_stored(wt, kinds[1])
    want_rows, want_cols = reference_sums(x, y)
    got_rows, got_cols = np.empty((3, rows)), np.zeros((3, cols))
    accumulate(a, b, got_rows, got_cols)
    np.testing.assert_allclose(got_rows, want_rows, rtol=1e-13, atol=0)
    np.testing.assert_allclose(got_cols, want_cols, rtol=1e-13, atol=0)


@settings(max_examples=40, deadline=None)
@given(bits=hnp.arrays(np.uint16, st.tuples(st.integers(1, 9), st.integers(1, 33))),
       code=st.sampled_from([BF16, F16]))
def test_any_finite_bit_patterns_sum_like_their_exact_values(bits, code):
    """Random 16-bit patterns (subnormals and extremes included) against numpy's float64."""
    values = bf16_values(bits) if code == BF16 else bits.view(np.float16).astype(np.float64)
    values[~np.isfinite(values)] = 0.0
    bits = bits.copy()
    bits[values == 0.0] = 0  # the non-finite ones (and zeros) as +0
    stored = bits if code == BF16 else bits.view(np.float16)
    rows, cols = np.empty((3, bits.shape[0])), np.zeros((3, bits.shape[1]))
    accumulate(stored, np.zeros_like(stored), rows, cols)
    want_rows, want_cols = reference_sums(values, np.zeros_like(values))
    np.testing.assert_allclose(rows, want_rows, rtol=1e-13, atol=0)
    np.testing.assert_allclose(cols, want_cols, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_blocks_give_zero_differences_and_equal_norms(kind):
    a, _ = as_stored(np.random.default_rng(1).standard_normal((13, 301)), kind)
    rows, cols = np.empty((3, 13)), np.zeros((3, 301))
    accumulate(a, a.copy(), rows, cols)
    assert (rows[2] == 0).all() and (cols[2] == 0).all()
    assert np.array_equal(rows[0], rows[1]) and np.array_equal(cols[0], cols[1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_values_reach_their_row_and_column_only(bad, kind):
    values = np.random.default_rng(2).standard_normal((6, 40))
    values[2, 17] = bad
    a, _ = as_stored(values, kind)
    b, _ = as_stored(np.ones((6, 40)), kind)
    rows, cols = np.empty((3, 6)), np.zeros((3, 40))
    accumulate(a, b, rows, cols)
    # |w0|² and |wt − w0|² of the vectors through the bad element, nothing else
    assert not np.isfinite(rows[[0, 2], 2]).any() and np.isfinite(np.delete(rows, 2, 1)).all()
    assert not np.isfinite(cols[[0, 2], 17]).any() and np.isfinite(np.delete(cols, 17, 1)).all()
    assert np.isfinite(rows[1]).all() and np.isfinite(cols[1]).all()


def test_column_sums_do_not_depend_on_how_rows_are_cut_into_blocks():
    """Columns are summed row after row in row order: any cut into consecutive blocks gives the
    same bits (the analysis's pieces are fixed by the plan, not by the threads)."""
    g = np.random.default_rng(3)
    a, _ = as_stored(g.standard_normal((97, 55)), "bfloat16")
    b, _ = as_stored(g.standard_normal((97, 55)), "bfloat16")
    whole_rows, whole = np.empty((3, 97)), np.zeros((3, 55))
    accumulate(a, b, whole_rows, whole)
    for cut in (1, 7, 50):
        rows, cols = np.empty((3, 97)), np.zeros((3, 55))
        for start in range(0, 97, cut):
            accumulate(a[start:start + cut], b[start:start + cut], rows[:, start:start + cut],
                       cols)
        assert np.array_equal(cols, whole) and np.array_equal(rows, whole_rows)


def test_one_axis_alone_agrees_with_both():
    """Per-axis loops are compiled apart: sums may differ in the last bits (another order of the
    vectorised reduction, a square fused with its addition or not), never more."""
    g = np.random.default_rng(4)
    a, b = g.standard_normal((9, 301)).astype(np.float32), g.standard_normal((9, 301))
    rows, cols = np.empty((3, 9)), np.zeros((3, 301))
    accumulate(a, b, rows, cols)
    only_rows, only_cols = np.empty((3, 9)), np.zeros((3, 301))
    accumulate(a, b, only_rows, None)
    accumulate(a, b, None, only_cols)
    np.testing.assert_allclose(only_rows, rows, rtol=1e-14, atol=0)
    np.testing.assert_allclose(only_cols, cols, rtol=1e-14, atol=0)


def test_inputs_are_checked():
    with pytest.raises(TypeError, match="int32"):
        accumulate(np.zeros((2, 2), np.int32), np.zeros((2, 2), np.int32), np.empty((3, 2)))
    with pytest.raises(ValueError, match="one shape"):
        accumulate(np.zeros((2, 2)), np.zeros((2, 3)), np.empty((3, 2)))


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "import sys; from dora_analysis.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)} | env)


def test_an_unwritable_cache_folder_runs_uncached_with_one_note(ckpts, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "table.csv"
    proc = run_cli([str(ckpts["base"]), str(ckpts["tuned"]), "-o", str(out)],
                   {"NUMBA_CACHE_DIR": str(blocker / "numba")})
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    kernel_notes = [line for line in notes if "kernel cache folder" in line]
    assert len(kernel_notes) == 1 and str(blocker / "numba") in kernel_notes[0], proc.stderr
    assert "Traceback" not in proc.stderr and out.stat().st_size > 0


def test_the_kernel_is_cached_in_its_folder(ckpts, tmp_path):
    folder = tmp_path / "kernel-cache"
    proc = run_cli([str(ckpts["base"]), str(ckpts["tuned"]), "-q"],
                   {"NUMBA_CACHE_DIR": str(folder)})
    assert proc.returncode == 0, proc.stderr
    assert list(folder.rglob("*.nbi")) and list(folder.rglob("*.nbc"))
    assert "kernel cache" not in proc.stderr
