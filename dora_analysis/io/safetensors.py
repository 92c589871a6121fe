"""Safetensors files: only the rows asked for are read, memory-mapped or with ``pread``, as numpy
arrays (torch tensors only when a caller asks for them)."""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..errors import CheckpointFormatError, DoraAnalysisError
from .base import TensorInfo, TensorSource, reason
from .dtypes import DTYPES, DType, from_safetensors
from .guard import GuardedFile, pread_exact, pread_into, shown
from .safetensors_header import Entry, decode_header, header_length, parse_header

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class SafetensorsFile(TensorSource):
    """One ``.safetensors`` file; reads only the rows asked for (memory-mapped or ``pread``).

    The header is validated by :func:`~dora_analysis.io.safetensors_header.parse_header`, the
    validator the remote reader uses too (as strict as the ``safetensors`` library; one parse,
    compact). The file is memory-mapped only while a read lease protects the mapping (see
    :mod:`dora_analysis.io.guard`); otherwise, and with ``backend="pread"``, rows are read with
    ``os.preadv`` into private buffers. Every read is bracketed by a check that the file did not
    change.
    """

    thread_safe = True  # positional reads (pread, slices of the mapping); no cursor

    def __init__(self, path: str | Path, backend: str = "mmap") -> None:
        self.path = Path(path)
        self._map: mmap.mmap | None = None
        self._guard = GuardedFile(self.path, lease=backend == "mmap")
        try:
            first = pread_exact(self._guard.fd, min(8, self._guard.size), 0)
            n = header_length(first, self._guard.size, self.path)
            text = decode_header(pread_exact(self._guard.fd, n, 8), self.path)  # bytes freed
            self._entries = parse_header(text, self._guard.size - 8 - n, self.path)
            del text
            self._data_start = 8 + n
            if self._guard.leased:  # copy-on-write: writable views (numba, torch.from_numpy)
                self._map = mmap.mmap(self._guard.fd, 0, access=mmap.ACCESS_COPY)
        except DoraAnalysisError:
            self.close()
            raise
        except (OSError, ValueError) as exc:  # a short read of a file that shrank, mmap
            self._guard.check()
            self.close()
            raise CheckpointFormatError(f"{shown(self.path)}: not a readable safetensors file "
                                        f"({reason(exc)}); re-download or re-save it") from None
        self._keys = sorted(self._entries)  # as safetensors lists them

    def keys(self) -> list[str]:
        return list(self._keys)

    def _read(self, name: str, read: Callable[[Entry, mmap.mmap | None], T]) -> T:
        """``read(entry, mapping or None)`` between two checks that the file is unchanged; the
        mapping only while the lease holds."""
        entry = self._entry(name)
        if self._map is not None and self._guard.lease_broken():
            self._map = None  # stop using the mapping first: the writer waits for the release
            self._guard.release()
        mapping = self._map
        self._guard.check()
        try:
            value = read(entry, mapping)
        except DoraAnalysisError:
            raise
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            self._guard.check()  # a short read because the file shrank: say that
            raise CheckpointFormatError(
                f"{shown(self.path)}: cannot read tensor '{name}' ({reason(exc)}); the file may "
                "be truncated or corrupt, re-download or re-save it") from None
        self._guard.check()
        return value

    def _entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointFormatError(f"{shown(self.path)}: no tensor '{name}'") from None

    def _dtype(self, name: str, entry: Entry) -> DType:
        dtype = DTYPES.get(from_safetensors(entry.dtype))
        if dtype is None:
            raise CheckpointFormatError(f"{shown(self.path)}: tensor '{name}' is stored as "
                                        f"{entry.dtype}, which torch cannot read")
        return dtype

    def info(self, name: str) -> TensorInfo:
        entry = self._entry(name)
        return TensorInfo(entry.shape, from_safetensors(entry.dtype))

    def get_tensor(self, name: str) -> torch.Tensor:
        shape = self._entry(name).shape
        if not shape:
            return self._read(name, lambda e, m: self._tensor(
                name, e, self._bytes(m, e.begin, e.end - e.begin), ())).reshape(())
        return self.get_rows(name, 0, shape[0]).reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, lambda e, m: self._rows_tensor(name, e, m, start, stop, None))

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        return self._read(name, lambda e, m: self._rows_tensor(name, e, m, start, stop, expert))

    def read_rows(self, name: str, start: int, stop: int, *, expert: int | None = None,
                  buffer: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        entry = self._entry(name)
        dtype = self._dtype(name, entry)
        if dtype.numpy is None:  # float8: numpy has no such type, torch reads it
            return super().read_rows(name, start, stop, expert=expert, buffer=buffer)

        def rows(e: Entry, mapping: mmap.mmap | None) -> np.ndarray:
            offset, size, row_shape = self._span(e, dtype, start, stop, expert)
            raw = self._bytes(mapping, e.begin + offset, size, buffer)
            return raw.view(dtype.numpy).reshape(-1, *row_shape)

        return self._read(name, rows)

    def mapped(self, name: str) -> bool:
        return self._map is not None

    def _span(self, entry: Entry, dtype: DType, start: int, stop: int, expert: int | None
              ) -> tuple[int, int, tuple[int, ...]]:
        """``(offset, size, row shape)`` of rows ``start:stop`` within the tensor's data (of
        expert ``expert``: ``(E, out, in)`` seen as ``(E·out, in)``)."""
        shape, base_row = entry.shape, 0
        if expert is not None:
            base_row, shape = expert * shape[1], shape[1:]
        start, stop = max(0, start), min(stop, shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        return (base_row + start) * row_bytes, max(0, stop - start) * row_bytes, shape[1:]

    def _rows_tensor(self, name: str, entry: Entry, mapping: mmap.mmap | None, start: int,
                     stop: int, expert: int | None) -> torch.Tensor:
        offset, size, row_shape = self._span(entry, self._dtype(name, entry), start, stop, expert)
        return self._tensor(name, entry, self._bytes(mapping, entry.begin + offset, size),
                            row_shape)

    def _tensor(self, name: str, entry: Entry, raw: np.ndarray, row_shape: tuple[int, ...]
                ) -> torch.Tensor:
        """Raw bytes as a torch tensor of the stored dtype, rows of ``row_shape`` (no copy)."""
        import torch

        dtype = self._dtype(name, entry).torch()
        if not raw.size:
            return torch.empty((0, *row_shape), dtype=dtype)
        return torch.from_numpy(raw).view(dtype).reshape(-1, *row_shape)

    def _bytes(self, mapping: mmap.mmap | None, at: int, size: int,
               buffer: np.ndarray | None = None) -> np.ndarray:
        """``size`` bytes at ``at`` of the data as a uint8 array: a view of the mapping (no copy;
        it keeps the mapping alive), or read with ``pread`` (into ``buffer`` when it is large
        enough)."""
        at += self._data_start
        if not size:
            return np.empty(0, dtype=np.uint8)
        if mapping is not None:
            return np.ndarray((size,), dtype=np.uint8, buffer=mapping, offset=at)
        if buffer is not None and buffer.size >= size:  # a reused buffer: no allocation
            pread_into(self._guard.fd, memoryview(buffer[:size]), at)
            return buffer[:size]
        return np.frombuffer(pread_exact(self._guard.fd, size, at), dtype=np.uint8)

    def close(self) -> None:
        self._map = None  # closed when the last read using it lets go
        self._guard.close()

