"""--intruders: counts against a numpy reference and PEFT's intruders.py, the rotation invariant,
planted intruders, and the on-disk cache of the base SVD."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.metrics import intruders as it
from dora_analysis.metrics import linalg

pm = pytest.importorskip("tests.peft_models")


def reference_count(w0: np.ndarray, wt: np.ndarray, k: int = 10, eps: float = 0.5) -> int:
    u0 = np.linalg.svd(w0, full_matrices=False)[0]
    ut = np.linalg.svd(wt, full_matrices=False)[0][:, :k]
    return int((np.abs(ut.T @ u0).max(axis=1) < eps).sum())


def save_pair(folder, base: dict, tuned: dict):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in base.items()}, str(folder / "b.safetensors"))
    save_file({k: v.float().contiguous() for k, v in tuned.items()},
              str(folder / "t.safetensors"))
    return folder / "b.safetensors", folder / "t.safetensors"


def svd_basis(rows: int, cols: int, seed: int):
    g = np.random.default_rng(seed)
    u, _ = np.linalg.qr(g.standard_normal((rows, min(rows, cols))))
    v, _ = np.linalg.qr(g.standard_normal((cols, min(rows, cols))))
    s = np.sort(g.uniform(1.0, 5.0, min(rows, cols)))[::-1]
    return u, s, v


@pytest.mark.parametrize("shape", [(50, 30), (30, 50)])
def test_rotations_inside_the_base_singular_basis_make_no_intruders(tmp_path, shape):
    u, s, v = svd_basis(*shape, seed=1)
    n = len(s)
    rotation = np.eye(n)
    for i in range(0, n - 1, 2):  # turn each pair (u_i, u_i+1) by 40°: max |cos| = cos 40°
        c, t = np.cos(np.radians(40)), np.sin(np.radians(40))
        rotation[i:i + 2, i:i + 2] = [[c, -t], [t, c]]
    w0, wt = u @ np.diag(s) @ v.T, (u @ rotation) @ np.diag(s) @ v.T
    b, t = save_pair(tmp_path, {"m.weight": torch.from_numpy(w0)},
                     {"m.weight": torch.from_numpy(wt)})
    table = da.analyze(b, t, intruders=True)
    assert table[it.INTRUDERS].tolist() == [0]
    # …but a tighter ε calls the 40° turns intruders (cos 40° = 0.77 < 0.8).
    assert da.analyze(b, t, intruders=True, intruder_eps=0.8)[it.INTRUDERS].item() == 10


def test_planted_directions_are_counted(tmp_path):
    u, s, v = svd_basis(50, 30, seed=2)  # U0 spans 30 of the 50 output dimensions
    w0 = u @ np.diag(s) @ v.T
    g = np.random.default_rng(3)
    outside = np.linalg.qr(np.column_stack([u, g.standard_normal((50, 2))]))[0][:, 30:]  # ⟂ U0
    tuned = {}
    for planted in (0, 1, 2):
        extra = sum(20.0 * (j + 1) * np.outer(outside[:, j], v[:, j]) for j in range(planted))
        tuned[f"layers.{planted}.m.weight"] = torch.from_numpy(w0 + extra)
    base = {name: torch.from_numpy(w0) for name in tuned}
    b, t = save_pair(tmp_path, base, tuned)
    table = da.analyze(b, t, intruders=True).set_index(C.NAME)
    assert [table.loc[f"layers.{i}.m.weight", it.INTRUDERS] for i in range(3)] == [0, 1, 2]
    # With k = 1 only the largest direction is tested.
    one = da.analyze(b, t, intruders=True, intruder_k=1).set_index(C.NAME)
    assert one.loc["layers.2.m.weight", it.INTRUDERS] == 1


def test_counts_match_numpy_on_random_non_square_updates(tmp_path):
    g = torch.Generator().manual_seed(4)
    base, tuned = {}, {}
    for i, (rows, cols, scale) in enumerate(((40, 24, 0.5), (24, 40, 2.0), (36, 36, 5.0))):
        w0 = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        low = torch.randn(rows, 3, generator=g, dtype=torch.float64) @ torch.randn(
            3, cols, generator=g, dtype=torch.float64)
        base[f"layers.{i}.m.weight"], tuned[f"layers.{i}.m.weight"] = w0, w0 + scale * low
    b, t = save_pair(tmp_path, base, tuned)
    table = da.analyze(b, t, intruders=True).set_index(C.NAME)
    b64, t64 = load_file(str(b)), load_file(str(t))
    counts = []
    for name in base:
        want = reference_count(b64[name].double().numpy(), t64[name].double().numpy())
        assert table.loc[name, it.INTRUDERS] == want
        counts.append(want)
    assert counts != [0, 0, 0]


@pytest.fixture(scope="module")
def lora_case(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pm.make_case(tmp_path_factory.mktemp("peft-intruders"), "lora", *pm.CASES["lora"],
                            seed=5)


def test_parity_with_peft_intruders_py(lora_case):
    """PEFT's reduce_intruder_dimension logs, per LoRA layer, the intruders among the top 10 of
    W + ΔW against W's left singular vectors (ε = 0.5): our counts must be the same."""
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    model = PeftModel.from_pretrained(pm.tiny_llama(), str(lora_case.adapter))
    logged = []
    reduce_intruder_dimension(model, logging_sink=logged.append)
    peft_counts = {}
    for line in logged:
        if (m := re.match(r"base_model\.model\.(\S+): (No intruders|Intruders: (\d+))", line)):
            peft_counts[m[1] + ".weight"] = int(m[3] or 0)
    ours = da.analyze(lora_case.base, lora_case.adapter, intruders=True)
    assert len(peft_counts) == len(ours) == 6  # q, v, down of 2 layers
    assert dict(zip(ours[C.NAME], ours[it.INTRUDERS], strict=True)) == peft_counts
    assert sum(peft_counts.values()) > 0  # the adapter does create intruders


def test_adapter_path_uses_products_and_agrees_with_the_merged_weights(lora_case):
    ours = da.analyze(lora_case.base, lora_case.adapter, intruders=True).set_index(C.NAME)
    base, merged = load_file(str(lora_case.base)), load_file(str(lora_case.merged))
    for name in ours.index:
        want = reference_count(base[name].double().numpy(), merged[name].double().numpy())
        assert ours.loc[name, it.INTRUDERS] == want


def counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(w, *args, **kw):
        calls.append(tuple(w.shape))
        return real(w, *args, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_the_base_basis_is_cached_once_per_base_matrix(tmp_path, monkeypatch, ckpts):
    cache = tmp_path / "cache"
    bases = counting(monkeypatch, it, "compute_basis")
    dense = counting(monkeypatch, linalg, "dense_svd")
    first = da.analyze(ckpts["base"], ckpts["tuned"], modules=("q", "down"), intruders=True,
                       svd_cache=str(cache))
    files = sorted((cache / "base-svd").glob("*.npz"))
    assert len(files) == len(first) == len(bases) == 6  # 3 layers × (q, down)
    assert dense == []  # every count certified from the Gram matrices: no dense SVD
    bases.clear()
    series = da.analyze(ckpts["base"], ckpts["series"], modules=("q", "down"), intruders=True,
                        svd_cache=str(cache))
    assert len(series) == 18 and bases == []  # every base matrix from the cache
    assert sorted((cache / "base-svd").glob("*.npz")) == files
    uncached = da.analyze(ckpts["base"], ckpts["tuned"], modules=("q", "down"), intruders=True,
                          svd_cache="none")
    assert len(bases) == 6 and uncached[it.INTRUDERS].tolist() == first[it.INTRUDERS].tolist()


def test_the_default_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch, ckpts):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    da.analyze(ckpts["base"], ckpts["tuned"], modules=("q",), intruders=True)
    assert len(list((tmp_path / "xdg" / "dora-analysis" / "base-svd").glob("*.npz"))) == 3
    assert it.cache_dir(None) == tmp_path / "xdg" / "dora-analysis"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(it.cache_dir("")).endswith(".cache/dora-analysis")
    assert it.cache_dir("None") is None and it.cache_dir("~/x") == it.Path.home() / "x"


def test_the_key_follows_the_content_and_damaged_entries_are_recomputed(tmp_path):
    w = torch.randn(7, 5, dtype=torch.float64)
    assert it.content_key(w, "a") == it.content_key(w.clone(), "a")
    changed = w.clone()
    changed[3, 1] += 1e-12
    assert it.content_key(changed, "a") != it.content_key(w, "a")
    assert it.content_key(w, "b") != it.content_key(w, "a")
    cpu = torch.device("cpu")
    first = it.base_basis(w.numpy(), "a", cpu, tmp_path)
    (entry,) = (tmp_path / "base-svd").glob("*.npz")
    assert first.z.dtype == np.float32 and first.z.shape == (5, 5) and first.tall
    for damage in (b"not an array", entry.read_bytes()[:100]):
        entry.write_bytes(damage)
        again = it.base_basis(w.numpy(), "a", cpu, tmp_path)
        assert np.array_equal(again.z, first.z)
        assert it.Basis.load(entry).z.shape == (5, 5)  # rewritten whole


def test_an_unwritable_cache_warns_and_still_counts(tmp_path, ckpts):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning, match="cannot write the SVD cache"):
        table = da.analyze(ckpts["base"], ckpts["tuned"], modules=("q",), intruders=True,
                           svd_cache=str(blocker / "cache"))
    assert table[it.INTRUDERS].notna().all()


@pytest.mark.parametrize("settings, message", [
    ({"intruder_k": 0}, "--intruder-k must be a positive whole number, got 0"),
    ({"intruder_eps": 0.0}, r"--intruder-eps must be a number in \(0, 1\], got 0.0"),
    ({"device": "cuda:x"}, "--device must be cpu, cuda or cuda:N, got .cuda:x."),
])
def test_bad_settings_are_refused(ckpts, settings, message):
    with pytest.raises(da.DoraAnalysisError, match=message):
        da.analyze(ckpts["base"], ckpts["tuned"], modules=("q",), intruders=True, **settings)
