"""Safetensors files: only the rows asked for are read, memory-mapped or with ``pread``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointFormatError
from .base import SAFETENSORS_DTYPES, TensorInfo, TensorSource, reason


class SafetensorsFile(TensorSource):
    """One ``.safetensors`` file; reads only the rows asked for (memory-mapped or ``pread``).

    The header is validated by ``safetensors`` itself. For ``pread`` the rows' byte range is read
    with ``os.pread`` (safetensors' own ``backend="pread"`` reads the whole tensor for a slice).
    """

    def __init__(self, path: str | Path, backend: str = "mmap") -> None:
        self.path = Path(path)
        self._backend = backend
        self._fd: int | None = None
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
            self._keys = list(self._file.keys())
            if backend == "pread":
                self._fd = os.open(self.path, os.O_RDONLY)
                with open(self.path, "rb") as f:
                    self._data_start = 8 + int.from_bytes(f.read(8), "little")
                    self._header = json.loads(f.read(self._data_start - 8))
        except Exception as exc:  # the Rust reader raises several types on corrupt input
            raise CheckpointFormatError(
                f"{self.path}: not a readable safetensors file ({reason(exc)}); "
                "re-download or re-save it"
            ) from None

    def keys(self) -> list[str]:
        return list(self._keys)

    def _guard(self, name: str, read: Callable[[], object]):
        try:
            return read()
        except Exception as exc:  # the Rust reader raises several types on corrupt input
            raise CheckpointFormatError(
                f"{self.path}: cannot read tensor '{name}' ({reason(exc)}); the file may be "
                "truncated or corrupt, re-download or re-save it"
            ) from None

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._guard(name, lambda: self._file.get_tensor(name))

    def info(self, name: str) -> TensorInfo:
        sl = self._guard(name, lambda: self._file.get_slice(name))
        stored = sl.get_dtype()
        return TensorInfo(tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(stored, stored))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self._fd is None:
            return self._guard(name, lambda: self._file.get_slice(name)[start:stop])
        return self._guard(name, lambda: self._pread_rows(name, start, stop))

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        if self._fd is None:
            return self._guard(name, lambda: self._file.get_slice(name)[expert, start:stop])
        return self._guard(name, lambda: self._pread_rows(name, start, stop, expert))

    def _pread_rows(self, name: str, start: int, stop: int, expert: int | None = None
                    ) -> torch.Tensor:
        entry = self._header[name]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = entry["shape"]
        base_row = 0
        if expert is not None:  # rows of one expert: (E, out, in) seen as (E·out, in)
            base_row, shape = expert * shape[1], shape[1:]
        stop = min(stop, shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        offset = (self._data_start + entry["data_offsets"][0]
                  + (base_row + start) * row_bytes)
        size = max(0, stop - start) * row_bytes
        buffer = bytearray(size)
        view, done = memoryview(buffer), 0
        while done < size:  # pread may return fewer bytes than asked
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError("unexpected end of file")
            done += n
        if not size:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(-1, *shape[1:])

    def close(self) -> None:
        self._file = None  # safe_open releases its mmap when collected
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
