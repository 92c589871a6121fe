"""The identity of every file a plan reads: recorded where the plan is made, checked where the
bytes are read — in this process or on a Dask worker on another machine.

The planner opens the checkpoints (headers only) inside :func:`recording`; every checkpoint file
opened there (through :class:`~dora_analysis.io.guard.GuardedFile`) is noted with its size,
modification time, device, inode and the host. Executors run each unit inside :func:`expecting`
with those identities, and a file opened there that is not the one planned is refused by name:

* **changed since planning** — its size or modification time differ (rewritten in place,
  truncated, or another file of the same size put there);
* **a different file** — same size and time, but another inode at that path on the planning
  machine (a copy put in its place, its time set back).

Size and time are compared on every machine: shared file systems (NFS, Lustre, bucket mounts)
report the server's. Device and inode are compared only on the planning machine, since other
machines number them their own way (an NFS client its own device numbers, a FUSE mount both).
A file rewritten in place with the same size and its time set back cannot be told from the
original without reading it all: that is the one change this check misses.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import CheckpointChangedError
from .printable import shown

_STATE = threading.local()


@functools.cache
def host() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from another without reading it."""

    size: int
    mtime_ns: int
    device: int
    inode: int
    host: str

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, host())


def key(path: str | os.PathLike) -> str:
    """How a file is named in a plan: its absolute path (workers get absolute paths too)."""
    return os.path.abspath(path)


@contextmanager
def recording() -> Iterator[dict[str, FileIdentity]]:
    """Collect the identity of every checkpoint file this thread opens meanwhile (by
    :func:`key`); an inner recording takes the files opened inside it."""
    seen: dict[str, FileIdentity] = {}
    outer = getattr(_STATE, "seen", None)
    _STATE.seen = seen
    try:
        yield seen
    finally:
        _STATE.seen = outer


@contextmanager
def expecting(files: Mapping[str, FileIdentity]) -> Iterator[None]:
    """Refuse, meanwhile in this thread, any file of ``files`` that opens as another version."""
    outer = getattr(_STATE, "expected", None)
    _STATE.expected = files
    try:
        yield
    finally:
        _STATE.expected = outer


def opened(path: str | os.PathLike, st: os.stat_result) -> None:
    """Note a checkpoint file just opened (``st``: its ``fstat``): record it, or check it
    against the identity the plan recorded. Raises :class:`CheckpointChangedError`."""
    seen = getattr(_STATE, "seen", None)
    expected = getattr(_STATE, "expected", None)
    if seen is None and not expected:
        return
    name = key(path)
    now = FileIdentity.of(st)
    if seen is not None:
        seen.setdefault(name, now)
    planned = expected.get(name) if expected else None
    if planned is not None:
        check(name, planned, now)


def check(path: str, planned: FileIdentity, now: FileIdentity) -> None:
    """Raise :class:`CheckpointChangedError` if ``now`` is not the file that was planned."""
    if now.size != planned.size:
        what = f"changed since planning: {planned.size} bytes then, {now.size} now"
    elif now.mtime_ns != planned.mtime_ns:
        what = "changed since planning: modified after the plan was made"
    elif (now.host == planned.host and now.device == planned.device
          and now.inode != planned.inode):
        what = "a different file from the one planned (another file was put at that path)"
    else:
        return
    raise CheckpointChangedError(f"{shown(path)}: {what}; a run must see the files it planned "
                                 "from: let whatever writes them finish, then run again")
