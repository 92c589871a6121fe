"""The machine as the analysis sees it: caches from sysfs, usable cores, and the block they give."""

from __future__ import annotations

from pathlib import Path

import pytest

from dora_analysis import hardware
from dora_analysis.hardware import (
    FALLBACK_CACHES,
    MAX_BLOCK_ELEMENTS,
    MIN_BLOCK_ELEMENTS,
    WORKING_BYTES_PER_ELEMENT,
    Cache,
    choose_block_elements,
    read_caches,
)


def fake_sysfs(root: Path, entries: list[tuple[int, str, str, str]]) -> Path:
    """A /sys/devices/system/cpu tree with cpu0's caches: (level, type, size, shared list)."""
    for i, (level, kind, size, shared) in enumerate(entries):
        d = root / "cpu0" / "cache" / f"index{i}"
        d.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size),
                            ("shared_cpu_list", shared)):
            (d / name).write_text(f"{value}\n")
    return root


def test_caches_are_read_from_sysfs(tmp_path):
    root = fake_sysfs(tmp_path, [(1, "Data", "48K", "0"), (1, "Instruction", "32K", "0"),
                                 (2, "Unified", "1024K", "0"), (3, "Unified", "32M", "0-3,8")])
    assert read_caches(root) == (Cache(1, 48 << 10, 1), Cache(2, 1 << 20, 1),
                                 Cache(3, 32 << 20, 5))


def test_unreadable_sysfs_gives_nothing_and_the_fallback_is_used(tmp_path, monkeypatch):
    assert read_caches(tmp_path) == ()
    fake_sysfs(tmp_path / "broken", [(2, "Unified", "lots", "0")])
    assert read_caches(tmp_path / "broken") == ()
    monkeypatch.setattr(hardware, "read_caches", lambda: ())
    hardware.caches.cache_clear()
    try:
        assert hardware.caches() == FALLBACK_CACHES
    finally:
        hardware.caches.cache_clear()


def test_usable_cpus_and_memory_are_positive():
    assert hardware.usable_cpus() >= 1
    assert hardware.memory_available() > 0


@pytest.mark.parametrize(("caches", "expected"), [
    # private 1 MiB L2 + half of a 32 MiB L3 shared by 2: 17 MiB, half of it for the block
    ((Cache(1, 48 << 10, 1), Cache(2, 1 << 20, 1), Cache(3, 32 << 20, 2)), 1 << 19),
    # the same L3 shared by 16 cores leaves each far less
    ((Cache(2, 1 << 20, 1), Cache(3, 32 << 20, 16)), 1 << 16),
    ((), MIN_BLOCK_ELEMENTS),  # nothing known: the smallest block
    ((Cache(2, 1 << 30, 1),), MAX_BLOCK_ELEMENTS),  # huge caches: capped
])
def test_block_is_chosen_from_the_per_core_cache_share(caches, expected):
    block = choose_block_elements(caches)
    assert block == expected
    assert block & (block - 1) == 0  # a power of two


def test_chosen_block_fits_the_cache_it_was_chosen_for():
    caches = (Cache(2, 2 << 20, 1), Cache(3, 96 << 20, 12))
    share = sum(c.per_cpu for c in caches)
    block = choose_block_elements(caches)
    assert block * WORKING_BYTES_PER_ELEMENT <= share // 2 < 2 * block * WORKING_BYTES_PER_ELEMENT
