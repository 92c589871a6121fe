"""The cross-run measures on arrays: against a float64 numpy reference on non-square bf16 and fp32
updates, TIES' own trimming, the invariants, and the factors' closed forms against dense ΔW."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_analysis.metrics.similarity import (
    Factors,
    inner,
    mask_jaccard,
    sign_conflict,
    subspace_similarity,
    trim_mask,
    update_cosine,
)
from dora_analysis.metrics.sparsity import unchanged_mask


def stored_delta(shape, dtype, seed):
    """ΔW of a bf16/fp32 checkpoint pair, exactly as stored values differ."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=g).to(dtype)
    wt = (w0.double() + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return w0, wt, (wt.double() - w0.double()).numpy()


def ties_topk_mask(delta: np.ndarray, k_share: float) -> np.ndarray:
    """TIES-merging's ``topk_values_mask`` (prateeky2806/ties-merging), on one flattened matrix:
    ``k = int(d * K); k = d - k; kth = M.abs().kthvalue(k); mask = M.abs() >= kth``."""
    m = torch.from_numpy(delta).reshape(1, -1)
    d = m.shape[1]
    k = d - int(d * k_share)
    kth, _ = m.abs().kthvalue(k, dim=1, keepdim=True)
    return (m.abs() >= kth).reshape(delta.shape).numpy()


def reference(da: np.ndarray, db: np.ndarray, k: int, trim: float) -> dict[str, float]:
    ua = np.linalg.svd(da)[0][:, :k]
    ub = np.linalg.svd(db)[0][:, :k]
    keep = ties_topk_mask(da, trim) & ties_topk_mask(db, trim) & (da != 0) & (db != 0)
    return {"cosine": float(np.sum(da * db) / np.linalg.norm(da) / np.linalg.norm(db)),
            "similarity": float(np.linalg.norm(ua.T @ ub) ** 2 / k),
            "conflict": float(np.mean(np.sign(da[keep]) != np.sign(db[keep])))}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(40, 27), (25, 70)])
def test_against_a_float64_reference(dtype, shape):
    w0a, wta, da = stored_delta(shape, dtype, seed=1)
    _, wtb, db = stored_delta(shape, dtype, seed=2)
    db = db + 0.7 * da  # correlated runs
    expected = reference(da, db, 5, 0.2)
    assert update_cosine(da, db) == pytest.approx(expected["cosine"], rel=1e-12)
    assert subspace_similarity(da, db, 5) == pytest.approx(expected["similarity"], rel=1e-9)
    assert sign_conflict(da, db, 0.2) == pytest.approx(expected["conflict"], rel=1e-15)
    # torch input, bf16 included, is read exactly
    assert update_cosine(torch.from_numpy(da), db) == update_cosine(da, db)
    changed_a = ~unchanged_mask(w0a, wta)
    changed_b = ~unchanged_mask(w0a, wtb)
    union, both = (changed_a | changed_b).sum(), (changed_a & changed_b).sum()
    assert mask_jaccard(changed_a, changed_b) == both / union


@pytest.mark.parametrize("trim", [0.2, 0.05, 0.5, 0.999, 1.0 / 3])
def test_trimming_is_ties_topk_values_mask_ties_included(trim):
    rng = np.random.default_rng(3)
    delta = rng.standard_normal((13, 31))
    delta[rng.random(delta.shape) < 0.3] = 0.0  # many ties at zero
    delta[0, :5] = delta[1, 3]  # and ties at the threshold's level
    np.testing.assert_array_equal(trim_mask(delta, trim), ties_topk_mask(delta, trim))


def test_invariants_against_itself_and_its_negation():
    _, _, d = stored_delta((30, 18), torch.bfloat16, seed=4)
    changed = d != 0
    assert update_cosine(d, d) == pytest.approx(1.0, abs=1e-15)
    assert subspace_similarity(d, d, 8) == pytest.approx(1.0, abs=1e-12)
    assert sign_conflict(d, d) == 0.0 and mask_jaccard(changed, changed) == 1.0
    assert update_cosine(d, -d) == pytest.approx(-1.0, abs=1e-15)
    assert sign_conflict(d, -d) == 1.0
    assert subspace_similarity(d, -d, 8) == pytest.approx(1.0, abs=1e-12)
    assert mask_jaccard(changed, changed) == 1.0
    # two empty sets of changed elements are equal: Jaccard 1 (our choice, documented)
    nothing = np.zeros((3, 4), dtype=bool)
    assert mask_jaccard(nothing, nothing) == 1.0
    zero = np.zeros_like(d)
    assert math.isnan(update_cosine(d, zero)) and math.isnan(subspace_similarity(d, zero))
    assert math.isnan(sign_conflict(d, zero))


def low_rank(shape, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g))


@pytest.mark.parametrize("ranks", [(4, 4), (3, 6), (8, 2)])
def test_closed_forms_from_factors_equal_the_dense_path(ranks):
    shape = (33, 57)
    ba, aa = low_rank(shape, ranks[0], 5)
    bb, ab = low_rank(shape, ranks[1], 6)
    fa, fb = Factors.of(ba, aa, 0.5), (bb, ab, 2.0)  # a Factors or a (B, A, scale) tuple
    da, db = fa.dense(), 2.0 * (bb.double() @ ab.double()).numpy()
    assert inner(fa, fb) == pytest.approx(float(np.sum(da * db)), rel=1e-12)
    assert inner(fa, db) == pytest.approx(float(np.sum(da * db)), rel=1e-12)  # mixed
    assert update_cosine(fa, fb) == pytest.approx(update_cosine(da, db), rel=1e-12)
    k = min(ranks)
    assert subspace_similarity(fa, fb, k) == pytest.approx(subspace_similarity(da, db, k),
                                                           rel=1e-9)
    assert sign_conflict(fa, fb) == sign_conflict(da, db)
    u, s, v = fa.svd()
    np.testing.assert_allclose((u * s) @ v.T, da, atol=1e-12)


def test_k_beyond_the_rank_is_clamped_with_a_note(caplog):
    ba, aa = low_rank((20, 30), 3, 7)
    bb, ab = low_rank((20, 30), 5, 8)
    with caplog.at_level(logging.INFO, logger="dora_analysis"):
        clamped = subspace_similarity((ba, aa, 1.0), (bb, ab, 1.0), 16, name="q_proj")
    assert "q_proj: k = 16 is more than the rank of ΔW (3 and 5); using k = 3" in caplog.text
    assert clamped == subspace_similarity((ba, aa, 1.0), (bb, ab, 1.0), 3)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(2, 20), cols=st.integers(2, 20), k=st.integers(1, 25),
       trim=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_symmetric_and_bounded(rows, cols, k, trim, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((rows, cols)), rng.standard_normal((rows, cols))
    for measure, low, high in ((update_cosine, -1, 1), (lambda x, y: subspace_similarity(x, y, k),
                                                        0, 1),
                               (lambda x, y: sign_conflict(x, y, trim), 0, 1)):
        value, swapped = measure(a, b), measure(b, a)
        if math.isnan(value):  # no entry kept in both trimmed updates: nothing to compare
            assert math.isnan(swapped)
            continue
        assert low <= value <= high
        assert value == pytest.approx(swapped, rel=1e-9, abs=1e-12)
