"""Sharded checkpoints: a Hugging Face ``*.index.json`` whose ``weight_map`` names each tensor's
shard file; shards are opened on first use by the reader of their own format."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import CheckpointFormatError, CheckpointNotFoundError
from .base import TensorInfo, TensorSource, reason


class ShardedCheckpoint(TensorSource):
    """Shards listed by a Hugging Face index (``*.index.json`` with a ``weight_map``)."""

    def __init__(self, index_path: str | Path, open_shard: Callable[[Path], TensorSource],
                 text: str | None = None) -> None:
        """``text``: the index's content when it is not a local file (remote storage, where
        missing shards are reported when opened)."""
        local = text is None
        self.path = Path(index_path) if local else index_path
        try:
            weight_map = json.loads(self.path.read_text() if local else text)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointFormatError(
                f"{self.path}: not a valid shard index ({reason(exc)}); it needs a "
                "'weight_map' object from tensor name to shard file"
            ) from None
        self._weight_map: dict[str, str] = weight_map
        self._open_shard = open_shard
        self._shards: dict[str, TensorSource] = {}
        missing = sorted({f for f in weight_map.values()
                          if local and not (self.path.parent / f).is_file()})
        if missing:
            raise CheckpointNotFoundError(
                f"{self.path}: shard file(s) missing: {', '.join(missing)}; download all shards"
            )

    def _shard(self, name: str) -> TensorSource:
        file = self._weight_map[name]
        if file not in self._shards:
            self._shards[file] = self._open_shard(self.path.parent / file)
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

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()
