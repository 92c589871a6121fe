"""The issue's invariants at the level of the table, on real files: a pure rescale of rows is
all magnitude (tangential fraction 0, ΔD 0); a rank-k update has energy_rank_90 ≤ k."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import columns as C


def analyse(tmp_path, w0: torch.Tensor, wt: torch.Tensor, **kw):
    save_file({"layers.0.mlp.up_proj.weight": w0}, str(tmp_path / "b.safetensors"))
    save_file({"layers.0.mlp.up_proj.weight": wt}, str(tmp_path / "t.safetensors"))
    return da.analyze(tmp_path / "b.safetensors", tmp_path / "t.safetensors", **kw).iloc[0]


def test_a_pure_rescale_of_rows_is_all_magnitude(tmp_path):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 30, generator=g, dtype=torch.float64)
    factors = 1 + 0.5 * torch.rand(12, 1, generator=g, dtype=torch.float64)
    row = analyse(tmp_path, w0, w0 * factors)
    assert abs(row[C.DELTA_D]) <= 1e-15 and row[C.DELTA_M] > 0.1
    assert abs(row["tangential_fraction"]) <= 1e-12 and row["warnings"] == ""


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(8, 40), cols=st.integers(8, 40), k=st.integers(1, 4),
       seed=st.integers(0, 2**31))
def test_a_rank_k_update_has_energy_rank_at_most_k(tmp_path_factory, rows, cols, k, seed):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    update = torch.randn(rows, k, generator=g, dtype=torch.float64) @ torch.randn(
        k, cols, generator=g, dtype=torch.float64)
    row = analyse(tmp_path_factory.mktemp("rank"), w0, w0 + 0.1 * update, spectrum=True)
    assert 1 <= row["energy_rank_90"] <= k and row["stable_rank"] <= k + 1e-6
