"""Fixtures that a real multi-process run writes (torchrun, 2 CPU processes, gloo).

Starting two Python processes that import torch (and DeepSpeed) takes 10-30 s on this machine,
too long to repeat in every test session. :func:`built_once` keeps what a worker wrote in pytest's
cache folder, keyed by the worker's source and the library versions, so it is rebuilt whenever
either changes (and on every fresh checkout, as in CI; in every session without the cache
plugin, ``-p no:cacheprovider``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: Path, *args: str, nproc: int = 2, env: dict | None = None,
             timeout: int = 600) -> None:
    """Run ``worker`` under ``torch.distributed.run`` on the loopback interface; fail loudly."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo",
                        "OMP_NUM_THREADS": "1"} | (env or {})
    for _attempt in range(3):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                               f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                               f"--master_port={free_port()}", str(worker), *args],
                              capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)
        # the port is free when chosen and may be taken before torchrun binds it (another
        # process on the machine): only that is tried again, with a new port
        if proc.returncode == 0 or not PORT_TAKEN.search(proc.stderr):
            break
    if proc.returncode != 0:
        raise RuntimeError(f"{worker.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


PORT_TAKEN = re.compile(r"address already in use|EADDRINUSE|errno: 98", re.IGNORECASE)


def built_once(config: pytest.Config, worker: Path, packages: Sequence[str],
               env: dict | None = None) -> Path:
    """The folder ``worker`` writes when run by :func:`torchrun`, built once per change."""
    key = hashlib.sha256(worker.read_bytes())
    for package in packages:
        key.update(f"{package}=={importlib.metadata.version(package)}".encode())
    name = f"{worker.stem}-{key.hexdigest()[:16]}"
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider: build it afresh
    folder = Path(cache.mkdir(name) if cache is not None else tempfile.mkdtemp(prefix=name))
    done = folder / "DONE"
    if not done.exists():
        out = folder / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        torchrun(worker, str(out), env=env)
        done.write_text("ok")
    return folder / "out"
