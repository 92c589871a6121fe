"""What the analysis needs to know about the machine it runs on: usable cores, cache sizes, and
the block of rows read at a time that they give.

Everything here is read once from the operating system (Linux sysfs and cgroups; ``os``
elsewhere) with a sane fallback, never imports torch, and is cheap enough for ``--help``.

Example:
    >>> cpus = usable_cpus()
    >>> cpus >= 1
    True
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Cache:
    """One data (or unified) cache as seen from one core."""

    level: int
    size: int
    """Bytes."""
    shared_by: int
    """How many logical CPUs share it (1 for a private cache)."""

    @property
    def per_cpu(self) -> int:
        """The share of one CPU when every CPU sharing it is busy."""
        return self.size // max(1, self.shared_by)


#: Assumed when the caches cannot be read (macOS, Windows, containers hiding sysfs): a private
#: 1 MiB level 2 and 32 MiB of last-level cache shared by 8 cores, common on x86 servers.
FALLBACK_CACHES: tuple[Cache, ...] = (Cache(2, 1 << 20, 1), Cache(3, 32 << 20, 8))


def _parse_size(text: str) -> int:
    """``"48K"`` / ``"1024K"`` / ``"32M"`` (sysfs notation) → bytes."""
    text = text.strip().upper()
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * factor


def _count_cpus(cpu_list: str) -> int:
    """``"0-3,8"`` (sysfs cpu list) → 5."""
    count = 0
    for part in cpu_list.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            count += int(hi) - int(lo) + 1
        elif part:
            count += 1
    return count


def read_caches(root: Path = SYSFS_CPU) -> tuple[Cache, ...]:
    """The data and unified caches of CPU 0 from sysfs, innermost first; empty if unreadable."""
    found = []
    for index in sorted((root / "cpu0" / "cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            if kind not in ("Data", "Unified"):
                continue
            found.append(Cache(int((index / "level").read_text()),
                               _parse_size((index / "size").read_text()),
                               _count_cpus((index / "shared_cpu_list").read_text())))
        except (OSError, ValueError):
            return ()
    return tuple(sorted(found, key=lambda c: c.level))


@functools.lru_cache(maxsize=1)
def caches() -> tuple[Cache, ...]:
    """This machine's data caches, innermost first (:data:`FALLBACK_CACHES` if unknown)."""
    return read_caches() or FALLBACK_CACHES


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup quota (containers, Kubernetes limits), if any."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def memory_available() -> int:
    """Bytes of memory available to new allocations now (``MemAvailable``; else total / 2)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


#: Bytes a block occupies per element while the kernel reduces it (:mod:`dora_analysis.kernel`):
#: the two stored rows read into a worker's buffers, at most 8 bytes each (float64). The kernel
#: itself keeps no per-element state.
WORKING_BYTES_PER_ELEMENT = 2 * 8
#: Bounds on the block: below, per-read overhead dominates; above, nothing is gained.
MIN_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS = 1 << 14, 1 << 22


def choose_block_elements(cache_list: tuple[Cache, ...] | None = None) -> int:
    """Elements per block read at a time, from the cache one busy core can count on.

    A block read into a worker's buffers (:data:`WORKING_BYTES_PER_ELEMENT` per element) should
    still be in the core's private level-2 cache plus its share of the last-level cache when the
    kernel reads it (shared caches are divided among the CPUs sharing them, every core being busy
    with its own worker), with half of that left to the rest of the process. The result is a
    power of two within [:data:`MIN_BLOCK_ELEMENTS`, :data:`MAX_BLOCK_ELEMENTS`];
    ``benchmarks/bench_kernel.py`` times the neighbours of the choice.

    Example:
        >>> choose_block_elements((Cache(2, 1 << 20, 1), Cache(3, 32 << 20, 2)))
        524288
    """
    levels = [c for c in (cache_list if cache_list is not None else caches()) if c.level >= 2]
    budget = sum(c.per_cpu for c in levels) // 2
    elements = max(1, budget // WORKING_BYTES_PER_ELEMENT)
    block = 1 << (elements.bit_length() - 1)  # round down to a power of two
    return min(MAX_BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, block))


#: Elements of one block on this machine (see :func:`choose_block_elements`).
DEFAULT_BLOCK_ELEMENTS = choose_block_elements()
