"""The LLM examples run end to end, offline, on their tiny local LLaMA (slow: real training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dora_analysis as da

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=900, check=False, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_causal_lm(tmp_path):
    out = run("train_causal_lm.py", "--out", str(tmp_path), "--steps", "4")
    table = da.read_table(tmp_path / "table.parquet")
    assert set(table["checkpoint"]) == {"ft", "lora", "dora"}
    assert sorted(set(table["step"])) == [1, 2, 3, 4]
    assert "pearson_r" in out


@pytest.mark.parametrize("trl", [False, True])
def test_trainer_callback(tmp_path, trl):
    run("trainer_callback.py", "--out", str(tmp_path), "--steps", "6", *(["--trl"] if trl else []))
    table = da.read_table(tmp_path / "run" / "dora_analysis.parquet")
    assert sorted(set(table["step"])) == [2, 4, 6] and set(table["method"]) == {"dora"}
