"""A bounded key → bytes store in one SQLite file, safe against kills and concurrent writers.

* **Atomic.** Every entry is its own transaction in SQLite's write-ahead log: a process killed at
  any moment (SIGKILL included) leaves each entry either whole or absent, never readable and
  damaged. ``synchronous=NORMAL``: a power cut may lose the last entries, never corrupt others.
* **Concurrent.** Several processes (two runs, the dashboard) read and write the same file;
  writers wait for each other (:data:`BUSY_TIMEOUT_S`). Not for network file systems (NFS), whose
  locks SQLite cannot rely on: point ``--cache`` at a local folder there.
* **Bounded.** The entries' bytes are counted (kept by triggers in the same transactions); past
  ``max_bytes`` the least recently used (written, or read more than an hour after its last
  use) are deleted, oldest first, until :data:`EVICT_TO` of it is left.

``benchmarks/bench_results_cache.py`` compares it with one file per entry (temp file + rename) on
a 7B model's 225 pairs × N checkpoints; SQLite was the cheaper (docs/robustness.md).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: The store's file in the cache folder (with ``-wal`` and ``-shm`` beside it while in use).
FILE_NAME = "results-v1.sqlite3"
#: Default bound on the entries' bytes; ``DORA_ANALYSIS_CACHE_MAX_MB`` changes it.
DEFAULT_MAX_BYTES = 512 << 20
MAX_ENV = "DORA_ANALYSIS_CACHE_MAX_MB"
EVICT_TO = 0.9
BUSY_TIMEOUT_S = 60.0
#: An entry read is marked as used again only when its mark is older than this (seconds).
REFRESH_S = 3600.0
#: Keys per query (SQLite's limit on bound parameters is 32766 since 3.32; stay well below).
BATCH = 500

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, size INTEGER NOT NULL, used REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_used ON entries(used);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL, entries INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries BEGIN
    UPDATE totals SET bytes = bytes + NEW.size, entries = entries + 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries BEGIN
    UPDATE totals SET bytes = bytes - OLD.size, entries = entries - 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS entries_replaced AFTER UPDATE OF size ON entries BEGIN
    UPDATE totals SET bytes = bytes + NEW.size - OLD.size WHERE id = 0; END;
COMMIT;
"""


def default_max_bytes() -> int:
    """The bound on the store's entries: ``DORA_ANALYSIS_CACHE_MAX_MB`` MiB, else 512 MiB."""
    text = os.environ.get(MAX_ENV, "").strip()
    try:
        return max(0, int(float(text) * (1 << 20))) if text else DEFAULT_MAX_BYTES
    except ValueError:
        return DEFAULT_MAX_BYTES


class Store:
    """Key → bytes in ``folder/``:data:`FILE_NAME`. Opening creates the folder and the file;
    an ``OSError`` or ``sqlite3.Error`` there means the folder cannot hold a cache.

    Example:
        >>> import tempfile
        >>> with Store(Path(tempfile.mkdtemp())) as store:
        ...     store.put("k", b"v")
        ...     store.get_many(["k", "x"])
        {'k': b'v'}
    """

    def __init__(self, folder: Path, max_bytes: int | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of those keys that are stored. Eviction takes the least recently used:
        an entry's use time is refreshed when it is read, at most every :data:`REFRESH_S`
        (a resumed run's lookups stay reads)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, bytes] = {}
        stale: list[str] = []
        now = time.time()
        for start in range(0, len(keys), BATCH):
            part = keys[start:start + BATCH]
            marks = ",".join("?" * len(part))
            for key, value, used in self._db.execute(
                    f"SELECT key, value, used FROM entries WHERE key IN ({marks})", part):
                found[key] = value
                if used < now - REFRESH_S:
                    stale.append(key)
        for start in range(0, len(stale), BATCH):
            part = stale[start:start + BATCH]
            with self._transaction():
                self._db.execute(f"UPDATE entries SET used = ? WHERE key IN "
                                 f"({','.join('?' * len(part))})", [now, *part])
        return found

    def put(self, key: str, value: bytes) -> None:
        """Store one entry (its own transaction), then evict the oldest if over the bound."""
        size = len(key) + len(value)
        self._db.execute(
            "INSERT INTO entries (key, value, size, used) VALUES (?, ?, ?, ?) ON CONFLICT(key) "
            "DO UPDATE SET value = excluded.value, size = excluded.size, used = excluded.used",
            (key, value, size, time.time()))
        if self.totals()[0] > self.max_bytes:
            self.evict()

    def totals(self) -> tuple[int, int]:
        """(bytes, entries) held."""
        return self._db.execute("SELECT bytes, entries FROM totals WHERE id = 0").fetchone()

    def evict(self) -> int:
        """Delete the least recently used entries until at most :data:`EVICT_TO` of the bound is
        held; returns how many were deleted."""
        removed = 0
        target = int(self.max_bytes * EVICT_TO)
        with self._transaction():  # another process sees the store before or after
            held, count = self.totals()
            while held > target and count:
                batch = max(1, min(count, (held - target) * count // held + 1))
                removed += self._db.execute(
                    "DELETE FROM entries WHERE key IN "
                    "(SELECT key FROM entries ORDER BY used LIMIT ?)", (batch,)).rowcount
                held, count = self.totals()
        return removed

    def clear(self) -> tuple[int, int]:
        """Delete every entry; returns the (bytes, entries) there were."""
        with self._transaction():
            before = self.totals()
            self._db.execute("DELETE FROM entries")
        self._db.execute("VACUUM")  # give the space back to the file system
        return before

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (the connection is in autocommit mode otherwise)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
