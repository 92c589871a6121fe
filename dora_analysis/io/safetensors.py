"""Safetensors files: only the rows asked for are read, memory-mapped or with ``pread``."""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from ..errors import CheckpointFormatError, DoraAnalysisError
from .base import SAFETENSORS_DTYPES, TensorInfo, TensorSource, reason
from .guard import GuardedFile, pread_exact, pread_into, shown
from .safetensors_header import Entry, decode_header, header_length, parse_header

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
            if self._guard.leased:  # copy-on-write: a writable view for torch.frombuffer
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
        except (OSError, ValueError, RuntimeError) as exc:
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

    def _dtype(self, name: str, entry: Entry) -> torch.dtype:
        dtype = SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is None:
            raise CheckpointFormatError(f"{shown(self.path)}: tensor '{name}' is stored as "
                                        f"{entry.dtype}, which torch cannot read")
        return dtype

    def info(self, name: str) -> TensorInfo:
        entry = self._entry(name)
        return TensorInfo(entry.shape, SAFETENSORS_DTYPES.get(entry.dtype, entry.dtype))

    def get_tensor(self, name: str) -> torch.Tensor:
        shape = self._entry(name).shape
        if not shape:
            return self._read(name, lambda e, m: self._bytes(name, e, m, 0, e.end - e.begin,
                                                             ())).reshape(())
        return self.get_rows(name, 0, shape[0]).reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, lambda e, m: self._rows(name, e, m, start, stop))

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        return self._read(name, lambda e, m: self._rows(name, e, m, start, stop, expert))

    def get_rows_into(self, name: str, start: int, stop: int, buffer: torch.Tensor,
                      expert: int | None = None) -> torch.Tensor:
        return self._read(name, lambda e, m: self._rows(name, e, m, start, stop, expert, buffer))

    def _rows(self, name: str, entry: Entry, mapping: mmap.mmap | None, start: int, stop: int,
              expert: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (of expert ``expert``: ``(E, out, in)`` seen as ``(E·out, in)``)."""
        shape, base_row = entry.shape, 0
        if expert is not None:
            base_row, shape = expert * shape[1], shape[1:]
        start, stop = max(0, start), min(stop, shape[0])
        row_bytes = math.prod(shape[1:]) * self._dtype(name, entry).itemsize
        offset = (base_row + start) * row_bytes
        return self._bytes(name, entry, mapping, offset, max(0, stop - start) * row_bytes,
                           shape[1:], out)

    def _bytes(self, name: str, entry: Entry, mapping: mmap.mmap | None, offset: int, size: int,
               row_shape: tuple[int, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        """``size`` bytes at ``offset`` of the tensor's data as rows of ``row_shape``: a view of
        the mapping (no copy; it keeps the mapping alive), or read with ``pread`` (into ``out``
        when it is large enough)."""
        dtype = self._dtype(name, entry)
        if not size:
            return torch.empty((0, *row_shape), dtype=dtype)
        at = self._data_start + entry.begin + offset
        if mapping is not None:
            flat = torch.frombuffer(mapping, dtype=dtype, count=size // dtype.itemsize, offset=at)
        elif out is not None and out.numel() >= size:  # a reused buffer: no allocation
            pread_into(self._guard.fd, memoryview(out[:size].numpy()), at)
            flat = out[:size].view(dtype)
        else:
            flat = torch.frombuffer(pread_exact(self._guard.fd, size, at), dtype=dtype)
        return flat.reshape(-1, *row_shape)

    def close(self) -> None:
        self._map = None  # closed when the last read using it lets go
        self._guard.close()
