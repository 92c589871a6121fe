"""Under torchrun DDP (2 processes, gloo, CPU): gradients are averaged, ranks stay identical,
and only rank 0 writes the checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp(tmp_path):
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                        "GLOO_SOCKET_IFNAME": "lo"}  # loopback only
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                           str(WORKER), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1 and any("lora_magnitude_vector" in k for k in rank0)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-3"]
    assert (tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors").is_file()
