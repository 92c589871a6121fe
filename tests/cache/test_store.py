"""The results cache's SQLite store: bounded (oldest evicted first), atomic under SIGKILL,
shared by several processes at once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dora_analysis.cache.store import FILE_NAME, Store

ROOT = Path(__file__).resolve().parents[2]


def test_put_get_and_totals(tmp_path):
    with Store(tmp_path) as store:
        store.put("a", b"x" * 10)
        store.put("b", b"y" * 20)
        store.put("a", b"z" * 5)  # replaced: counted once, with its new size
        assert store.get_many(["a", "b", "c"]) == {"a": b"z" * 5, "b": b"y" * 20}
        assert store.totals() == (2 + 5 + 20, 2)
        assert store.clear() == (27, 2)
        assert store.totals() == (0, 0) and store.get_many(["a"]) == {}


def test_the_oldest_entries_are_evicted_past_the_bound(tmp_path):
    with Store(tmp_path, max_bytes=10_000) as store:
        for i in range(100):
            store.put(f"k{i:03d}", b"v" * 200)  # 204 bytes each: 49 fit
        held, count = store.totals()
        assert held <= 10_000 and count < 49
        kept = store.get_many([f"k{i:03d}" for i in range(100)])
        assert sorted(kept) == [f"k{i:03d}" for i in range(100 - count, 100)]  # the newest


def test_an_entry_read_again_is_kept_over_older_ones(tmp_path, monkeypatch):
    clock = iter(range(1_000_000, 2_000_000, 4000))  # each put or read: 4000 s later
    monkeypatch.setattr("dora_analysis.cache.store.time.time", lambda: next(clock))
    with Store(tmp_path, max_bytes=1000) as store:
        for i in range(4):
            store.put(f"k{i}", b"v" * 200)
        assert store.get_many(["k0"])  # used again: now the most recent
        store.put("k4", b"v" * 200)  # over the bound: k1 goes (the oldest), k0 stays
        assert sorted(store.get_many([f"k{i}" for i in range(5)])) == ["k0", "k2", "k3", "k4"]


def test_the_bound_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DORA_ANALYSIS_CACHE_MAX_MB", "0.5")
    with Store(tmp_path) as store:
        assert store.max_bytes == 1 << 19


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dora_analysis.cache.store import Store
    store = Store(Path(sys.argv[1]), max_bytes=1 << 40)
    tag, n = sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    for i in range(n):
        store.put(f"{tag}-{i}", (f"{tag}-{i}|" * 50).encode())
""")


def writer(folder: Path, tag: str, n: int) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), tag, str(n)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def check_entries(folder: Path) -> dict[str, bytes]:
    """Every entry whole (its value is its key repeated), the file consistent."""
    db = sqlite3.connect(folder / FILE_NAME)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    entries = dict(db.execute("SELECT key, value FROM entries"))
    assert db.execute("SELECT bytes, entries FROM totals").fetchone() == (
        sum(len(k) + len(v) for k, v in entries.items()), len(entries))
    db.close()
    for key, value in entries.items():
        assert value == (f"{key}|" * 50).encode(), key
    return entries


def test_two_processes_write_at_once(tmp_path):
    procs = [writer(tmp_path, tag, 400) for tag in ("a", "b")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    entries = check_entries(tmp_path)
    assert len(entries) == 800


def test_a_writer_killed_at_any_moment_leaves_whole_entries(tmp_path):
    times = [0.05, 0.2, 0.35, 0.5, 0.8]
    for i, delay in enumerate(times):
        proc = writer(tmp_path, f"w{i}", 100_000)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        entries = check_entries(tmp_path)  # opened afresh: the WAL is recovered
        assert any(k.startswith(f"w{i}-") for k in entries)


def test_a_folder_that_cannot_hold_it_is_an_error_at_opening(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        Store(tmp_path / "file" / "cache")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / FILE_NAME).write_bytes(os.urandom(4096))
    with pytest.raises(sqlite3.DatabaseError):
        Store(tmp_path / "junk")
