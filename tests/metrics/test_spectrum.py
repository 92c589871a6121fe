"""--spectrum: every column against an independent float64 numpy reference on non-square
matrices, the LoRA closed form against the dense path, and the rank invariants."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.metrics import spectrum as sp
from dora_analysis.pairs import PairView

pm = pytest.importorskip("tests.peft_models")

SPECTRUM = (sp.UPDATE_NORM, sp.RELATIVE_UPDATE, sp.SIGMA_1, sp.STABLE_RANK, sp.EFFECTIVE_RANK,
            sp.ENERGY_RANK_90, sp.AMPLIFICATION)


def reference(w0: np.ndarray, wt: np.ndarray, r: int) -> dict[str, float]:
    """The spectral columns straight from numpy's SVD, in float64."""
    d = wt - w0
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    energy = s**2
    p = s / s.sum()
    p = p[p > 0]
    return {
        sp.UPDATE_NORM: np.linalg.norm(d),
        sp.RELATIVE_UPDATE: np.linalg.norm(d) / np.linalg.norm(w0),
        sp.SIGMA_1: s[0],
        sp.STABLE_RANK: energy.sum() / s[0] ** 2,
        sp.EFFECTIVE_RANK: np.exp(-(p * np.log(p)).sum()),
        sp.ENERGY_RANK_90: int(np.argmax(np.cumsum(energy) >= 0.9 * energy.sum())) + 1,
        sp.AMPLIFICATION: np.linalg.norm(d) / np.linalg.norm(u[:, :r].T @ w0 @ vh[:r].T),
    }


def assert_close(row, want, rel=1e-9):
    for col in SPECTRUM:
        assert row[col] == pytest.approx(want[col], rel=rel), col


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and a fine-tuned checkpoint: non-square matrices both ways, a dense FT-like update
    plus a strong rank-2 part."""
    root = tmp_path_factory.mktemp("spectrum")
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i, (out, inp) in enumerate(((24, 40), (40, 24), (33, 17))):
        w0 = torch.randn(out, inp, generator=g, dtype=torch.float64)
        low = torch.randn(out, 2, generator=g, dtype=torch.float64) @ torch.randn(
            2, inp, generator=g, dtype=torch.float64)
        update = 1e-3 * torch.randn(out, inp, generator=g, dtype=torch.float64) + 1e-2 * low
        base[f"model.layers.{i}.mlp.up_proj.weight"] = w0.float()
        tuned[f"model.layers.{i}.mlp.up_proj.weight"] = (w0 + update).float()
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return root / "base.safetensors", root / "tuned.safetensors"


def test_dense_columns_match_numpy_on_non_square_matrices(pair):
    table = da.analyze(*pair, spectrum=True, axis="both")
    base, tuned = load_file(str(pair[0])), load_file(str(pair[1]))
    assert len(table) == 6
    for row in table.to_dict("records"):
        w0, wt = (x[row[C.NAME]].double().numpy() for x in (base, tuned))
        assert_close(row, reference(w0, wt, r=16))
    # One value per matrix, the same on both axis rows.
    assert (table.groupby(C.NAME)[sp.EFFECTIVE_RANK].nunique() == 1).all()
    assert str(table[sp.ENERGY_RANK_90].dtype) == "Int64"


def test_amplification_rank_setting(pair):
    table = da.analyze(*pair, spectrum=True, amplification_rank=2)
    base, tuned = load_file(str(pair[0])), load_file(str(pair[1]))
    for row in table.to_dict("records"):
        w0, wt = (x[row[C.NAME]].double().numpy() for x in (base, tuned))
        assert row[sp.AMPLIFICATION] == pytest.approx(reference(w0, wt, r=2)[sp.AMPLIFICATION],
                                                      rel=1e-9)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = tmp_path_factory.mktemp("peft-spectrum")
        return {name: pm.make_case(root, name, *pm.CASES[name], seed=i)
                for i, name in enumerate(("lora", "gpt2_lora", "dora"))}


@pytest.mark.parametrize("name", ["lora", "gpt2_lora"])
def test_lora_closed_form_equals_the_dense_path(cases, name, monkeypatch):
    case = cases[name]
    closed = da.analyze(case.base, case.adapter, spectrum=True)
    calls = []
    monkeypatch.setattr(PairView, "low_rank", lambda self: calls.append(1) or None)
    dense = da.analyze(case.base, case.adapter, spectrum=True)
    assert calls  # the dense path really ran
    for got, want in zip(closed.to_dict("records"), dense.to_dict("records"), strict=True):
        assert got[C.NAME] == want[C.NAME]
        for col in SPECTRUM:
            if col == sp.EFFECTIVE_RANK:  # the dense path sees rounding-level σ beyond rank r
                assert got[col] == pytest.approx(want[col], rel=1e-6), col
            else:
                assert got[col] == pytest.approx(want[col], rel=1e-9), col
        assert got[sp.ENERGY_RANK_90] <= 4 and got[sp.EFFECTIVE_RANK] <= 4 + 1e-9


def test_lora_closed_form_matches_peft_merged_weights(cases):
    """Against PEFT's own merge_and_unload (float32), numpy's SVD, r = the adapter's rank."""
    case = cases["lora"]
    ours = da.analyze(case.base, case.adapter, spectrum=True)
    base, merged = load_file(str(case.base)), load_file(str(case.merged))
    for row in ours.to_dict("records"):
        want = reference(base[row[C.NAME]].double().numpy(), merged[row[C.NAME]].double().numpy(),
                         r=4)
        for col in (sp.UPDATE_NORM, sp.RELATIVE_UPDATE, sp.SIGMA_1, sp.STABLE_RANK,
                    sp.ENERGY_RANK_90, sp.AMPLIFICATION):
            assert row[col] == pytest.approx(want[col], rel=1e-5), col


def test_dora_uses_the_dense_path_and_its_adapter_rank(cases):
    case = cases["dora"]
    ours = da.analyze(case.base, case.adapter, spectrum=True)
    base, merged = load_file(str(case.base)), load_file(str(case.merged))
    for row in ours.to_dict("records"):
        want = reference(base[row[C.NAME]].double().numpy(), merged[row[C.NAME]].double().numpy(),
                         r=4)
        assert row[sp.AMPLIFICATION] == pytest.approx(want[sp.AMPLIFICATION], rel=1e-4)
        assert row[sp.UPDATE_NORM] == pytest.approx(want[sp.UPDATE_NORM], rel=1e-5)


def test_unchanged_and_non_finite_matrices(tmp_path):
    w0 = torch.randn(6, 9)
    bad = w0.clone()
    bad[2, 3] = float("nan")
    save_file({"a.weight": w0, "b.weight": w0.clone()}, str(tmp_path / "base.safetensors"))
    save_file({"a.weight": w0, "b.weight": bad}, str(tmp_path / "tuned.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = da.analyze(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                           spectrum=True).set_index(C.NAME)
    same = table.loc["a.weight"]
    assert same[sp.UPDATE_NORM] == 0.0 and same[sp.SIGMA_1] == 0.0
    assert same[sp.RELATIVE_UPDATE] == 0.0
    for col in (sp.STABLE_RANK, sp.EFFECTIVE_RANK, sp.ENERGY_RANK_90, sp.AMPLIFICATION):
        assert pd.isna(same[col]), col
    assert all(pd.isna(table.loc["b.weight", c]) for c in SPECTRUM)


def test_hand_computed_summary():
    # σ = (4, 3): ‖ΔW‖ = 5, stable rank 25/16, energy 16/25 = 0.64 < 0.9 → k = 2,
    # p = (4/7, 3/7): effective rank exp(−Σ p log p).
    d = sp.spectral_summary(torch.tensor([3.0, 4.0], dtype=torch.float64))
    p = np.array([4, 3]) / 7
    assert d[sp.UPDATE_NORM] == 5.0 and d[sp.SIGMA_1] == 4.0
    assert d[sp.STABLE_RANK] == pytest.approx(25 / 16) and d[sp.ENERGY_RANK_90] == 2
    assert d[sp.EFFECTIVE_RANK] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    # Ten equal values: 9 of them hold exactly 90 % of the energy.
    assert sp.spectral_summary(torch.ones(10, dtype=torch.float64))[sp.ENERGY_RANK_90] == 9


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(3, 30), cols=st.integers(3, 30), k=st.integers(1, 3),
       seed=st.integers(0, 2**31), scale=st.floats(1e-6, 1e3))
def test_a_rank_k_update_has_ranks_at_most_k(rows, cols, k, seed, scale):
    g = np.random.default_rng(seed)
    d = scale * g.standard_normal((rows, k)) @ g.standard_normal((k, cols))
    s = torch.linalg.svdvals(torch.from_numpy(d))
    got = sp.spectral_summary(s)
    assert got[sp.ENERGY_RANK_90] <= k
    assert got[sp.STABLE_RANK] <= k + 1e-9 and got[sp.EFFECTIVE_RANK] <= k + 1e-6
    again = sp.spectral_summary(7.0 * s)  # the ranks do not depend on the update's size
    for col in (sp.STABLE_RANK, sp.EFFECTIVE_RANK, sp.ENERGY_RANK_90):
        assert again[col] == pytest.approx(got[col], rel=1e-9)


def test_blas_runs_one_thread_in_every_worker_and_the_bits_do_not_change(pair, monkeypatch):
    """The executors limit NumPy's BLAS to one thread from the thread that starts the workers
    (OpenBLAS ignores a limit set later from a worker thread), so the decompositions — and the
    table — are the same bits whoever computes them."""
    from threadpoolctl import threadpool_info

    seen = []
    real = sp.gram_columns

    def recorded(*args, **kwargs):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return real(*args, **kwargs)

    monkeypatch.setattr(sp, "gram_columns", recorded)
    tables = [da.analyze(*pair, spectrum=True, workers=w) for w in (1, 2, 1)]
    assert seen and all(s == {1} for s in seen), seen
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table, tables[0], check_exact=True)
