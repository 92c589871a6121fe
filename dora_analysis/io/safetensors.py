"""Safetensors files: only the rows asked for are read, memory-mapped or with ``pread``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open

from ..errors import CheckpointFormatError, DoraAnalysisError
from .base import SAFETENSORS_DTYPES, TensorInfo, TensorSource, reason
from .guard import GuardedFile, pread_exact, pread_into, shown

T = TypeVar("T")


class SafetensorsFile(TensorSource):
    """One ``.safetensors`` file; reads only the rows asked for (memory-mapped or ``pread``).

    The header is validated by ``safetensors`` itself. The file is memory-mapped only while a read
    lease protects the mapping (see :mod:`dora_analysis.io.guard`); otherwise, and with
    ``backend="pread"``, rows are read with ``os.preadv`` into private buffers (safetensors' own
    ``backend="pread"`` reads the whole tensor for a slice). Every read is bracketed by a check
    that the file did not change.
    """

    thread_safe = True  # positional reads (pread, slices of the mapping); no cursor

    def __init__(self, path: str | Path, backend: str = "mmap") -> None:
        self.path = Path(path)
        self._file = None
        self._guard = GuardedFile(self.path, lease=backend == "mmap")
        try:
            self._file = safe_open(self._guard.open_path, framework="pt", device="cpu")
            self._keys = list(self._file.keys())
            header_len = int.from_bytes(pread_exact(self._guard.fd, 8, 0), "little")
            self._header = json.loads(pread_exact(self._guard.fd, header_len, 8))
            self._data_start = 8 + header_len
        except Exception as exc:  # the Rust reader raises several types on corrupt input
            self.close()
            raise CheckpointFormatError(
                f"{shown(self.path)}: not a readable safetensors file ({self._reason(exc)}); "
                "re-download or re-save it"
            ) from None
        if not self._guard.leased:
            self._file = None  # unprotected mappings are never read

    def _reason(self, exc: BaseException) -> str:
        return reason(exc).replace(self._guard.open_path, shown(self.path))

    def keys(self) -> list[str]:
        return list(self._keys)

    def _read(self, name: str, mapped: Callable[[object], T], pread: Callable[[], T]) -> T:
        """``mapped(safe_open handle)`` while the lease holds, else ``pread()``, between two
        checks that the file is unchanged."""
        if self._file is not None and self._guard.lease_broken():
            self._file = None  # stop using the mapping first: the writer waits for the release
            self._guard.release()
        self._guard.check()
        try:
            value = mapped(self._file) if self._file is not None else pread()
        except DoraAnalysisError:
            raise
        except Exception as exc:  # the Rust reader raises several types on corrupt input
            self._guard.check()  # a short read because the file shrank: say that
            raise CheckpointFormatError(
                f"{shown(self.path)}: cannot read tensor '{name}' ({self._reason(exc)}); the "
                "file may be truncated or corrupt, re-download or re-save it"
            ) from None
        self._guard.check()
        return value

    def _entry(self, name: str) -> tuple[dict, torch.dtype | str, list[int]]:
        entry = self._header[name]
        return entry, SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]), entry["shape"]

    def info(self, name: str) -> TensorInfo:
        try:
            _, dtype, shape = self._entry(name)
        except KeyError:
            raise CheckpointFormatError(f"{shown(self.path)}: no tensor '{name}'") from None
        return TensorInfo(tuple(shape), dtype)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._read(name, lambda f: f.get_tensor(name), lambda: self._pread_tensor(name))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, lambda f: f.get_slice(name)[start:stop],
                          lambda: self._pread_rows(name, start, stop))

    def _pread_tensor(self, name: str) -> torch.Tensor:
        entry, dtype, shape = self._entry(name)
        begin, end = entry["data_offsets"]
        data = pread_exact(self._guard.fd, end - begin, self._data_start + begin)
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        return self._read(name, lambda f: f.get_slice(name)[expert, start:stop],
                          lambda: self._pread_rows(name, start, stop, expert))

    def get_rows_into(self, name: str, start: int, stop: int, buffer: torch.Tensor,
                      expert: int | None = None) -> torch.Tensor:
        index = slice(start, stop) if expert is None else (expert, slice(start, stop))
        return self._read(name, lambda f: f.get_slice(name)[index],
                          lambda: self._pread_rows(name, start, stop, expert, buffer))

    def _pread_rows(self, name: str, start: int, stop: int, expert: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        entry, dtype, shape = self._entry(name)
        base_row = 0
        if expert is not None:  # rows of one expert: (E, out, in) seen as (E·out, in)
            base_row, shape = expert * shape[1], shape[1:]
        stop = min(stop, shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        offset = self._data_start + entry["data_offsets"][0] + (base_row + start) * row_bytes
        size = max(0, stop - start) * row_bytes
        if not size:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        if out is not None and out.numel() >= size:  # a reused buffer: no allocation, no zeroing
            pread_into(self._guard.fd, memoryview(out[:size].numpy()), offset)
            return out[:size].view(dtype).reshape(-1, *shape[1:])
        data = pread_exact(self._guard.fd, size, offset)
        return torch.frombuffer(data, dtype=dtype).reshape(-1, *shape[1:])

    def close(self) -> None:
        self._file = None  # safe_open releases its mmap when collected
        self._guard.close()
