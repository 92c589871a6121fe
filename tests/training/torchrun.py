"""Launch a worker script under torchrun with 2 CPU processes (gloo over loopback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: Path | str, *args: str, processes: int = 2, timeout: int = 600) -> None:
    """Run ``worker`` (a script, or ``-m`` and a module as ``args``) in ``processes`` processes;
    fail with its stderr if any fails."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}  # loopback only
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
                           f"--master_port={free_port()}", str(worker), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
