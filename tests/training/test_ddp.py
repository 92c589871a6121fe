"""Under torchrun DDP (2 processes, gloo, CPU): gradients are averaged, ranks stay identical,
and only rank 0 writes the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.torchrun import torchrun

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_ddp(tmp_path):
    torchrun(WORKER, str(tmp_path), timeout=300)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1 and any("lora_magnitude_vector" in k for k in rank0)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-3"]
    assert (tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors").is_file()


ACCUMULATION = Path(__file__).with_name("accumulation_worker.py")


def test_accumulation_across_processes_equals_one_big_batch(tmp_path):
    """2 processes × batch 2 × accumulation 2 (DDP and FSDP2) give the gradient of batch 8 in
    one process: each process weighs its micro-batches by their share of the target tokens of
    all processes (counted with an all_reduce)."""
    torchrun(ACCUMULATION, str(tmp_path), timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["tokens"] != ranks[1]["tokens"]  # the processes hold different shares
    for result in ranks:
        assert result["ddp"] <= 1e-6 and result["fsdp"] <= 1e-6, result
