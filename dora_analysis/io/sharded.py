"""Sharded checkpoints: a Hugging Face ``*.index.json`` whose ``weight_map`` names each tensor's
shard file; shards are opened on first use by the reader of their own format.

The index is checked before any shard is read, and mistakes are blamed on the index: every
``weight_map`` value must be the name of a regular file in its folder (the rule of
:func:`~dora_analysis.io.guard.confined`: never absolute, never climbing out with ``..``, never a
symbolic link out of the folder), and every shard must hold the tensors the index assigns to it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    listing,
)
from .base import TensorInfo, TensorSource
from .guard import confined, confined_name, path_kind, shown
from .jsonfile import parse_json_object, read_json_object

if TYPE_CHECKING:
    import numpy as np
    import torch

_FIX = "it needs a 'weight_map' object from tensor name to shard file; re-save the checkpoint"


class ShardedCheckpoint(TensorSource):
    """Shards listed by a Hugging Face index (``*.index.json`` with a ``weight_map``)."""

    def __init__(self, index_path: str | Path, open_shard: Callable[[Path], TensorSource],
                 text: str | bytes | None = None) -> None:
        """``text``: the index's content when it is not a local file (remote storage, where
        missing shards are reported when opened)."""
        local = text is None
        self.path = Path(index_path) if local else index_path
        what = "not a valid shard index"
        index = (read_json_object(self.path, what=what, fix=_FIX) if local
                 else parse_json_object(text, self.path, what=what, fix=_FIX))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{shown(self.path)}: not a valid shard index "
                                        f"('weight_map' is missing or not an object); {_FIX}")
        bad = [f"'{k}' → {v!r}"[:120] for k, v in weight_map.items()
               if confined_name(v) is not None]
        if bad:  # the same rule for local and remote indexes; every offender listed
            raise UnsafeCheckpointError(
                f"{shown(self.path)}: weight_map values must be shard file names beside the "
                f"index, got {listing(bad, 3)}; re-save the checkpoint")
        self._weight_map: dict[str, str] = weight_map
        self._open_shard = open_shard
        self._shards: dict[str, TensorSource] = {}
        self._lock = threading.Lock()  # worker threads open shards on first use
        # local shards are files (safetensors, torch) that threads may read at once
        self.thread_safe = local
        if local:
            self._check_files()

    def _check_files(self) -> None:
        folder = self.path.parent
        files = sorted(set(self._weight_map.values()))
        kinds = {f: path_kind(confined(folder, f, named_by=self.path)) for f in files}
        missing = [f for f in files if kinds[f] is None]
        if missing:
            raise CheckpointNotFoundError(
                f"{shown(self.path)}: the index lists {len(missing)} shard file(s) that are not "
                f"beside it ({listing(missing, 3)}); the index and the shard files do not match: "
                "download the missing shards, or re-save the checkpoint if the index is stale")
        odd = [f for f in files if kinds[f] != "file"]
        if odd:
            raise CheckpointFormatError(
                f"{shown(self.path)}: the index lists shard(s) that are not regular files "
                f"({listing(odd, 3)}); point it at the shard files")

    def _shard(self, name: str) -> TensorSource:
        file = self._weight_map[name]
        with self._lock:
            if file not in self._shards:
                shard = self._open_shard(self.path.parent / file)
                listed = [n for n, f in self._weight_map.items() if f == file]
                absent = sorted(set(listed) - set(shard.keys()))
                if absent:
                    shard.close()
                    raise CheckpointFormatError(
                        f"{shown(self.path)}: the index puts {len(absent)} tensor(s) in {file} "
                        f"that it does not hold ({listing(absent, 3)}); the index and the shards "
                        "do not match: re-download or re-save the checkpoint")
                self._shards[file] = shard
            return self._shards[file]

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._shard(name).get_tensor(name)

    def info(self, name: str) -> TensorInfo:
        return self._shard(name).info(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._shard(name).get_rows(name, start, stop)

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        return self._shard(name).get_expert_rows(name, expert, start, stop)

    def will_read(self, names: Sequence[str]) -> None:
        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name in self._weight_map:
                by_shard.setdefault(self._weight_map[name], []).append(name)
        for shard_names in by_shard.values():
            self._shard(shard_names[0]).will_read(shard_names)

    @property
    def bytes_read(self) -> int | None:
        counts = [s.bytes_read for s in self._shards.values() if s.bytes_read is not None]
        return sum(counts) if counts else None

    def read_rows(self, name: str, start: int, stop: int, *, expert: int | None = None,
                  buffer: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        return self._shard(name).read_rows(name, start, stop, expert=expert, buffer=buffer)

    def mapped(self, name: str) -> bool:
        return self._shard(name).mapped(name)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()
