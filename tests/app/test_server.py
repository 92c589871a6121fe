"""The dashboard as `dora-dashboard` starts it (no address given): bound to 127.0.0.1 by the
command's default, reachable from this machine only — wherever it is started from."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lan_address() -> str | None:
    """This machine's address on its network, if it has one besides loopback."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))  # sends nothing: only picks the outgoing interface
            candidates.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        candidates.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return next((a for a in candidates if not a.startswith(("127.", "0."))), None)


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def start(port: int, *extra: str, cwd: Path | None = None, **env: str):
    """``dora-dashboard --headless --port PORT`` (from ``cwd``, default a folder of its own), with
    no dashboard or Streamlit settings from the environment but ``env``; returns the process and
    the lines it printed, filled in by a reader thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DORA_DASHBOARD", "STREAMLIT_"))} | env
    proc = subprocess.Popen(
        [sys.executable, "-m", "dora_analysis.app.serve", "--headless", "--port", str(port),
         *extra],
        cwd=cwd or tempfile.mkdtemp(prefix="dora-dashboard-cwd-"), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 90
    while time.time() < deadline and not reachable("127.0.0.1", port):
        assert proc.poll() is None, "".join(lines)
        time.sleep(0.3)
    time.sleep(1.0)  # every URL line is printed by now
    return proc, lines


def stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def test_the_default_server_is_local_only():
    port = free_port()
    proc, lines = start(port)
    try:
        urls = [line.strip() for line in lines if "URL:" in line]
        assert urls == [f"URL: http://127.0.0.1:{port}"], "".join(lines)  # no "Network URL"
        assert reachable("127.0.0.1", port)
        lan = lan_address()
        if lan is not None:
            assert not reachable(lan, port)
    finally:
        stop(proc)
