"""The results cache's store: one SQLite file (WAL) against one file per entry (temp + rename).

A 7B LLaMA has 225 analysed matrices (32 layers × 7 + lm_head); a series of N checkpoints is
225 × N entries, each one pair's values as the cache encodes them (real values of a real pair,
default metrics, axis ``out``). Both stores write one entry at a time, each atomic on its own (a
SQLite transaction; a temporary file renamed into place), neither with fsync (both survive a
SIGKILL, neither a power cut unflushed: SQLite keeps its file consistent, the file store needs a
checksum to spot a torn entry); then the resumed run's lookup of every key, and the disk used.

    .venv/bin/python benchmarks/bench_results_cache.py [--checkpoints 10 100]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1]))
import dora_analysis as da  # noqa: E402
from dora_analysis.analysis import compute_pair, plan  # noqa: E402
from dora_analysis.cache.results import encode  # noqa: E402
from dora_analysis.cache.store import Store  # noqa: E402
from dora_analysis.io.open import open_checkpoint  # noqa: E402
from tests.common import llama_state, perturb  # noqa: E402

PAIRS_7B = 32 * 7 + 1


def sample_entry(root: Path) -> bytes:
    """One real pair's values, encoded as the cache stores them."""
    base = llama_state(0)
    save_file(base, str(root / "b.safetensors"))
    save_file(perturb(base, 0.02, seed=1), str(root / "t.safetensors"))
    work = plan(root / "b.safetensors", root / "t.safetensors", config=da.AnalysisConfig())
    with open_checkpoint(work.base) as b, open_checkpoint(work.jobs[0].checkpoint.path) as t:
        return encode(compute_pair(b, t, work.jobs[0].pairs[1], work.config))


class FileStore:
    """One file per entry: written to a temporary name, renamed into place; a SHA-256 prefix
    spots a torn entry (a power cut before the page cache was written)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / key

    def put(self, key: str, value: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(hashlib.sha256(value).digest() + value)
        os.replace(tmp, path)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        found = {}
        for key in keys:
            try:
                data = self._path(key).read_bytes()
            except FileNotFoundError:
                continue
            if hashlib.sha256(data[32:]).digest() == data[:32]:
                found[key] = data[32:]
        return found


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def measure(store, keys: list[str], value: bytes) -> tuple[float, float]:
    start = time.perf_counter()
    for key in keys:
        store.put(key, value)
    written = time.perf_counter() - start
    start = time.perf_counter()
    assert len(store.get_many(keys)) == len(keys)
    return written, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        value = sample_entry(root)
        print(f"entry: {len(value)} bytes; machine shared with other jobs: read the ratios")
        print("checkpoints  entries  store    write µs/entry  lookup µs/entry  disk MiB")
        for n in args.checkpoints:
            keys = [hashlib.sha256(f"{n}-{i}".encode()).hexdigest() for i in range(PAIRS_7B * n)]
            rows = {}
            for name in ("sqlite", "files"):
                folder = root / f"{name}-{n}"
                store = Store(folder, max_bytes=1 << 40) if name == "sqlite" else FileStore(folder)
                written, looked = measure(store, keys, value)
                if name == "sqlite":
                    store.close()
                rows[name] = (written, looked)
                print(f"{n:>11}  {len(keys):>7}  {name:<7}  {1e6 * written / len(keys):>14.1f}  "
                      f"{1e6 * looked / len(keys):>15.1f}  {disk_bytes(folder) / 2**20:>8.1f}")
                shutil.rmtree(folder)
            (sw, sl), (fw, fl) = rows["sqlite"], rows["files"]
            print(f"{'':>11}  sqlite / files: write {sw / fw:.2f}×, lookup {sl / fl:.2f}×")


if __name__ == "__main__":
    main()
