"""--sparsity: ulps and rounding against brute force, the columns against a float64 reference on
non-square bf16 and fp32 matrices, adapters against PEFT's merge_and_unload + .to(bf16)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.errors import ConfigError
from dora_analysis.metrics.arrays import rounded, stored, ulp
from dora_analysis.metrics.sparsity import merged_weight, unchanged_mask, update_sparsity

ALL_BF16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def next_magnitude_gap(x: torch.Tensor) -> np.ndarray:
    """Brute force: the next bit pattern of |x| in its own dtype, minus |x| (float64)."""
    a = x.abs()
    width = {2: torch.int16, 4: torch.int32}[x.element_size()]
    up = (a.view(width).to(torch.int64) + 1).to(width).view(x.dtype)
    gap = up.double() - a.double()
    return np.where(torch.isfinite(a).numpy(), gap.numpy(), np.nan)


def test_bf16_ulp_is_the_gap_to_the_next_bit_pattern_for_every_bf16_value():
    expected = next_magnitude_gap(ALL_BF16)  # the largest finite value's next is inf
    np.testing.assert_array_equal(ulp(ALL_BF16), expected)


def test_fp16_and_fp32_ulp_are_numpy_spacing_of_the_magnitude():
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = np.spacing(np.abs(halves)).astype(np.float64)
    expected[~np.isfinite(halves)] = np.nan
    np.testing.assert_array_equal(ulp(halves), expected)
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 10.0 ** np.arange(
        -20, 30, 0.01)[:5000].astype(np.float32)
    np.testing.assert_array_equal(ulp(x), np.spacing(np.abs(x)).astype(np.float64))
    np.testing.assert_array_equal(ulp(torch.from_numpy(x)), ulp(x))


#: Every finite bf16 value, ascending, with its bit pattern: the brute-force rounding table.
_FINITE = ALL_BF16[torch.isfinite(ALL_BF16)]
_ORDER = torch.argsort(_FINITE.double())
TABLE = _FINITE[_ORDER].double().numpy()
TABLE_BITS = _FINITE[_ORDER].view(torch.int16).numpy().view(np.uint16)


def nearest_bf16(x: float) -> float:
    """Round to nearest bf16, ties to the even bit pattern, by searching every value."""
    i = int(np.searchsorted(TABLE, x))
    candidates = [j for j in (i - 1, i) if 0 <= j < len(TABLE)]
    best = min(candidates, key=lambda j: (abs(TABLE[j] - x), TABLE_BITS[j] & 1))
    return TABLE[best]


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-3e38, max_value=3e38, allow_nan=False)
       | st.floats(min_value=-1e-37, max_value=1e-37))
def test_rounding_to_bf16_is_once_to_nearest_even(x):
    got = rounded(np.array([x]), "bfloat16").values()[0]
    expected = nearest_bf16(x)
    assert got == expected or (got == 0 and expected == 0)


def test_rounding_to_bf16_at_exact_ties_and_past_the_largest_value():
    one_tie = 1 + 2.0**-8  # halfway between 1 and 1 + 2^-7: the even one is 1
    assert rounded(np.array([one_tie, one_tie + 2.0**-30]), "bfloat16").values().tolist() == [
        1.0, 1 + 2.0**-7]  # torch rounds the second to 1.0 (through float32)
    big = float(np.ldexp(2.0 - 2.0**-8, 127))  # max + half an ulp: rounds to inf (even)
    assert rounded(np.array([big, -big]), "bfloat16").values().tolist() == [math.inf, -math.inf]
    values = ALL_BF16[torch.isfinite(ALL_BF16)]
    np.testing.assert_array_equal(rounded(values.double().numpy(), "bfloat16").bits,
                                  stored(values).bits)


def reference(w0: torch.Tensor, wt: torch.Tensor, tol: float) -> dict[str, float]:
    """The four columns written out plainly in float64, ulps by brute force."""
    width = {2: torch.int16, 4: torch.int32}[w0.element_size()]
    same = (w0.view(width) == wt.view(width)).numpy()
    diff = (wt.double() - w0.double()).abs().numpy()
    ratios = diff[~same] / next_magnitude_gap(w0)[~same]
    return {"unchanged_fraction": same.sum() / same.size,
            "unchanged_fraction_tol": (diff <= tol).sum() / same.size,
            "unchanged_rows": same.all(axis=1).sum() / same.shape[0],
            "median_ulps": float(np.median(ratios)) if ratios.size else math.nan}


def sparse_update(shape, dtype, seed, step=1e-3, density=0.3):
    """A base and a tuned matrix where some updates are rounded away and some rows untouched."""
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    mask = torch.rand(shape, generator=g, dtype=torch.float64) < density
    mask[::4] = False  # whole rows unchanged
    update = step * torch.randn(shape, generator=g, dtype=torch.float64) * mask
    return w0, (w0.double() + update).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("step", [1e-6, 1e-4, 1e-2])
def test_the_columns_against_a_float64_reference(dtype, step):
    w0, wt = sparse_update((37, 23), dtype, seed=int(step * 1e6) + 1, step=step)
    expected = reference(w0, wt, 1e-5)
    for got in (update_sparsity(w0, wt), update_sparsity(w0.numpy() if dtype != torch.bfloat16
                                                          else w0, wt)):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-15, nan_ok=True), key


def test_invariants_and_edge_cases():
    w0, wt = sparse_update((9, 14), torch.bfloat16, seed=3)
    same = update_sparsity(w0, w0.clone())
    assert (same["unchanged_fraction"], same["unchanged_rows"], same["unchanged_fraction_tol"]) \
        == (1.0, 1.0, 1.0) and math.isnan(same["median_ulps"])
    one_ulp = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    up = (one_ulp.view(torch.int16) + 1).view(torch.bfloat16)
    assert update_sparsity(one_ulp, up)["median_ulps"] == 1.0
    assert unchanged_mask(np.zeros(2), np.array([0.0, -0.0])).tolist() == [True, False]
    # a base of one dtype, a run of another: the same value counts as unchanged
    mixed = update_sparsity(w0.float(), wt)
    assert mixed["unchanged_fraction"] == reference(w0, wt, 1e-5)["unchanged_fraction"]
    with pytest.raises(ConfigError, match="unsupported stored dtype"):
        update_sparsity(np.zeros((2, 2), dtype=np.int32), np.zeros((2, 2), dtype=np.int32))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 2**31),
       step=st.sampled_from([1e-7, 1e-4, 1e-1]))
def test_the_shares_are_ordered_and_bounded(rows, cols, seed, step):
    w0, wt = sparse_update((rows, cols), torch.bfloat16, seed, step=step)
    got = update_sparsity(w0, wt, tol=0.0)
    # bitwise unchanged implies |Δ| ≤ 0; a share of whole unchanged rows is as many elements
    assert 0.0 <= got["unchanged_rows"] <= got["unchanged_fraction"] \
        <= got["unchanged_fraction_tol"] <= 1.0
    assert math.isnan(got["median_ulps"]) or got["median_ulps"] > 0


def test_the_table_column_on_bf16_files(tmp_path):
    w0, wt = sparse_update((20, 33), torch.bfloat16, seed=5)
    name = "model.layers.0.mlp.down_proj.weight"
    save_file({name: w0}, str(tmp_path / "b.safetensors"))
    save_file({name: wt}, str(tmp_path / "t.safetensors"))
    table = da.analyze(tmp_path / "b.safetensors", tmp_path / "t.safetensors", sparsity=True,
                       sparsity_tol=1e-4, axis="both")
    expected = reference(w0, wt, 1e-4)
    for _, row in table.iterrows():  # one value per matrix, on both axis rows
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-15), key
    with pytest.raises(ConfigError, match="--sparsity-tol must be a number ≥ 0"):
        da.analyze(tmp_path / "b.safetensors", tmp_path / "t.safetensors", sparsity=True,
                   sparsity_tol=-1.0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_are_merged_as_merge_and_unload_stores_them(tmp_path, use_dora):
    """A bf16 base, an fp32 adapter with small updates (many rounded away): the columns equal
    those of PEFT's merge_and_unload in float32, then .to(bf16), matrix by matrix."""
    peft = pytest.importorskip("peft")
    from tests.peft_models import tiny_llama

    model = tiny_llama(seed=4).to(torch.bfloat16).float()  # base values that bf16 holds
    base = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                             use_dora=use_dora)
    peft_model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(3e-3 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = {k: v.to(torch.bfloat16) for k, v in peft_model.merge_and_unload().state_dict()
              .items()}
    table = da.analyze(tmp_path / "base.safetensors", tmp_path / "adapter", sparsity=True)
    assert len(table) == 4
    for _, row in table.iterrows():
        expected = update_sparsity(base[row["name"]], merged[row["name"]])
        assert 0 < expected["unchanged_fraction"] < 1  # the case is not trivial
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-12), (row["name"], key)


def test_merged_weight_rounds_once_to_the_base_dtype():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(6, 10, generator=g).to(torch.bfloat16)
    b, a = torch.randn(6, 2, generator=g), torch.randn(2, 10, generator=g)
    got = merged_weight(w0, b, a, 0.01)
    exact = w0.double().numpy() + 0.01 * (b.double() @ a.double()).numpy()
    assert got.dtype == "bfloat16"
    np.testing.assert_array_equal(got.values(), rounded(exact, "bfloat16").values())
    assert np.abs(got.values() - exact).max() <= 0.5 * ulp(got).max()
