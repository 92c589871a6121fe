"""Safetensors inputs need no torch: ``analyze`` and ``dora-analyze`` on local files, sharded
folders and remote URLs run on numpy and the compiled kernel alone; other inputs give the same
numbers through torch's readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from tests.common import llama_state, perturb, write_sharded
from tests.servers import FileServer

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
import dora_analysis as da
from dora_analysis.cli import main

pairs, out = json.loads(sys.argv[1]), sys.argv[2]
rows = [len(da.analyze(base, tuned, axis="both")) for base, tuned in pairs]
codes = [main([base, tuned, "-q", "-o", out]) for base, tuned in pairs]
print(json.dumps({"rows": rows, "codes": codes,
                  "loaded": sorted(m for m in ("torch", "transformers", "peft")
                                   if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """Base/tuned pairs in bf16, fp16 and fp64 (fp32 are the shared fixtures), one sharded."""
    root = tmp_path_factory.mktemp("dtypes")
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        name = str(dtype).removeprefix("torch.")
        base = llama_state(0, dtype)
        save_file(base, str(root / f"{name}-base.safetensors"))
        write_sharded(perturb(base, 0.01, seed=3), root / f"{name}-tuned")
    return root


def test_safetensors_local_sharded_and_remote_never_import_torch(ckpts, stored, tmp_path):
    local = [(ckpts["base"], ckpts["tuned"]), (ckpts["base"], ckpts["sharded"])]
    local += [(stored / f"{d}-base.safetensors", stored / f"{d}-tuned")
              for d in ("bfloat16", "float16", "float64")]
    with FileServer(ckpts["root"]) as server:
        remote = [(f"{server.url}/base.safetensors", f"{server.url}/tuned.safetensors"),
                  (f"{server.url}/base.safetensors", f"{server.url}/tuned_sharded/")]
        pairs = [[str(a), str(b)] for a, b in local] + [list(p) for p in remote]
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(pairs), str(tmp_path / "t.csv")],
            capture_output=True, text=True, timeout=600,
            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], proc.stderr  # no torch, transformers or peft
    assert result["codes"] == [0] * len(pairs)
    expected = len(da.analyze(ckpts["base"], ckpts["tuned"], axis="both"))  # here, with torch
    assert result["rows"] == [expected] * len(pairs)


@pytest.mark.parametrize("axis", ["out", "in", "both"])
def test_torch_readers_give_the_same_numbers(ckpts, axis):
    """A pickle (read by torch) and the same weights in safetensors (read without it) reach the
    kernel as the same values: the tables agree bit for bit."""
    columns = ["name", "axis", "delta_m", "delta_d", "tangential_fraction", "mean_m0"]
    st = da.analyze(ckpts["base"], ckpts["tuned"], axis=axis)[columns]
    pt = da.analyze(ckpts["base"], ckpts["bin"], axis=axis)[columns]
    assert st.equals(pt)
