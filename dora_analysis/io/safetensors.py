"""Safetensors files, local or remote: one reader (:class:`SafetensorsFile`) over a source of
bytes. Only the rows asked for are read, as numpy arrays (torch tensors only when a caller asks
for them). A local file's bytes are memory-mapped or read with ``pread`` (:class:`LocalBytes`,
here); a remote file's come in coalesced ranges (:class:`~dora_analysis.io.remote_safetensors.
RemoteBytes`). The header, the spans of rows, dtypes and conversions are this module's alone."""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from ..errors import CheckpointFormatError, DoraAnalysisError
from .base import TensorInfo, TensorSource, reason
from .dtypes import DTYPES, DType, from_safetensors
from .guard import GuardedFile, pread_exact, pread_into, shown
from .safetensors_header import Entry, decode_header, header_length, parse_header

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: The first read: small headers fit; a longer one (a 7B shard: ~20-30 KiB) takes one more.
FIRST_READ_BYTES = 1 << 14
#: Parsed headers kept per file version (remote files name theirs by content; the plan and the
#: run open each file) ...
HEADER_CACHE_SIZE = 256
#: ... and at most this many tensors in all (a header near the 100 MB cap holds ~850 000).
HEADER_CACHE_ENTRIES = 1_000_000
#: file version → (data start, parsed header); oldest dropped first.
_HEADERS: dict[tuple, tuple[int, dict[str, Entry]]] = {}


def forget_headers() -> None:
    """Drop the parsed headers kept for files opened before (tests measure first reads)."""
    _HEADERS.clear()


class Bytes(Protocol):
    """Where a safetensors file's bytes come from. Offsets are from the start of the file."""

    path: object
    """The file: a local path or a URL."""
    where: str
    """The file as messages name it."""
    size: int
    version: tuple | None
    """What names this content (a remote ETag …): its parsed header is kept; None: never."""
    thread_safe: bool

    def header(self, at: int, size: int) -> bytes:
        """Bytes of the header, read once and not kept."""

    def read(self, at: int, size: int, buffer: np.ndarray | None = None,
             ahead: tuple[int, int] | None = None) -> np.ndarray:
        """``size`` bytes at ``at`` as a writable uint8 array: a view of a mapping, ``buffer``
        (when it is large enough) or a new array. ``ahead``: ``(row bytes, end)`` of the tensor
        they belong to (reading ahead may go by whole rows up to ``end``)."""

    def guarded(self, read: Callable[[], T], what: str) -> T:
        """``read()``, with the source's checks around it; ``what`` names it in errors."""

    def plan(self, spans: Sequence[tuple[int, int]]) -> None:
        """The byte ranges read next (a remote source coalesces them)."""

    def mapped(self) -> bool: ...

    def close(self) -> None: ...


class SafetensorsFile(TensorSource):
    """One ``.safetensors`` file, local (a path; ``backend`` ``"mmap"`` or ``"pread"``) or any
    :class:`Bytes`; reads only the rows asked for.

    The header is validated by :func:`~dora_analysis.io.safetensors_header.parse_header` (as
    strict as the ``safetensors`` library; one parse, compact).
    """

    def __init__(self, path: str | Path | Bytes, backend: str = "mmap") -> None:
        source = LocalBytes(path, backend) if isinstance(path, str | Path) else path
        self._source = source
        self.path = source.path
        try:
            self._data_start, self._entries = source.guarded(self._read_header, "")
        except DoraAnalysisError:
            source.close()
            raise
        self._keys = sorted(self._entries)  # as safetensors lists them

    def _read_header(self) -> tuple[int, dict[str, Entry]]:
        source = self._source
        if source.version is not None and source.version in _HEADERS:
            return _HEADERS[source.version]  # opened before: same bytes, same header
        first = source.header(0, min(source.size, FIRST_READ_BYTES))
        n = header_length(first, source.size, source.where)
        # a long header in one more read of its own: never two copies of it at once
        raw = first[8:8 + n] if 8 + n <= len(first) else source.header(8, n)
        del first
        text = decode_header(raw, source.where)
        del raw
        parsed = 8 + n, parse_header(text, source.size - 8 - n, source.where)
        del text
        if source.version is not None:
            _HEADERS[source.version] = parsed
            while len(_HEADERS) > HEADER_CACHE_SIZE or (
                    len(_HEADERS) > 1 and sum(len(e) for _, e in _HEADERS.values())
                    > HEADER_CACHE_ENTRIES):  # oldest first; the newest is always kept
                _HEADERS.pop(next(iter(_HEADERS)), None)
        return parsed

    @property
    def thread_safe(self) -> bool:  # type: ignore[override]
        return self._source.thread_safe

    def keys(self) -> list[str]:
        return list(self._keys)

    def _entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointFormatError(f"{self._source.where}: no tensor '{name}'") from None

    def _dtype(self, name: str, entry: Entry) -> DType:
        dtype = DTYPES.get(from_safetensors(entry.dtype))
        if dtype is None:
            raise CheckpointFormatError(f"{self._source.where}: tensor '{name}' is stored as "
                                        f"{entry.dtype}, which torch cannot read")
        return dtype

    def info(self, name: str) -> TensorInfo:
        entry = self._entry(name)
        return TensorInfo(entry.shape, from_safetensors(entry.dtype))

    def will_read(self, names: Sequence[str]) -> None:
        start = self._data_start
        self._source.plan(sorted((start + self._entries[n].begin, start + self._entries[n].end)
                                 for n in dict.fromkeys(names) if n in self._entries))

    def mapped(self, name: str) -> bool:
        return self._source.mapped()

    def _bytes(self, entry: Entry, offset: int, size: int,
               buffer: np.ndarray | None = None) -> np.ndarray:
        """``size`` bytes at ``offset`` of ``entry``'s data."""
        if not size:
            return np.empty(0, dtype=np.uint8)
        start = self._data_start
        return self._source.read(start + entry.begin + offset, size, buffer,
                                 ahead=(entry.row_bytes, start + entry.end))

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

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        if entry.shape:
            return self.get_rows(name, 0, entry.shape[0]).reshape(entry.shape)
        return self._source.guarded(lambda: self._tensor(
            name, entry, self._bytes(entry, 0, entry.end - entry.begin), ()),
            f"tensor '{name}'").reshape(())

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if not self._entry(name).shape:
            return self.get_tensor(name)
        return self._rows_tensor(name, start, stop, None)

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        return self._rows_tensor(name, start, stop, expert)

    def read_rows(self, name: str, start: int, stop: int, *, expert: int | None = None,
                  buffer: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        entry = self._entry(name)
        dtype = self._dtype(name, entry)
        if dtype.numpy is None or not entry.shape:  # float8: numpy has no such type
            return super().read_rows(name, start, stop, expert=expert, buffer=buffer)

        def rows() -> np.ndarray:
            offset, size, row_shape = self._span(entry, dtype, start, stop, expert)
            raw = self._bytes(entry, offset, size, buffer)
            return raw.view(dtype.numpy).reshape(-1, *row_shape)

        return self._source.guarded(rows, f"tensor '{name}'")

    def _rows_tensor(self, name: str, start: int, stop: int, expert: int | None
                     ) -> torch.Tensor:
        entry = self._entry(name)

        def rows() -> torch.Tensor:
            offset, size, row_shape = self._span(entry, self._dtype(name, entry), start, stop,
                                                 expert)
            return self._tensor(name, entry, self._bytes(entry, offset, size), row_shape)

        return self._source.guarded(rows, f"tensor '{name}'")

    def _tensor(self, name: str, entry: Entry, raw: np.ndarray, row_shape: tuple[int, ...]
                ) -> torch.Tensor:
        """Raw bytes as a torch tensor of the stored dtype, rows of ``row_shape`` (no copy)."""
        import torch

        dtype = self._dtype(name, entry).torch()
        if not raw.size:
            return torch.empty((0, *row_shape), dtype=dtype)
        return torch.from_numpy(raw).view(dtype).reshape(-1, *row_shape)

    def close(self) -> None:
        self._source.close()


class LocalBytes:
    """A local file's bytes: memory-mapped while a read lease protects the mapping (see
    :mod:`dora_analysis.io.guard`), else (and with ``backend="pread"``) read with ``os.preadv``
    into private buffers; every read bracketed by a check that the file did not change."""

    version = None  # a local file is parsed afresh at each opening: it may have been rewritten
    thread_safe = True  # positional reads (pread, slices of the mapping); no cursor

    def __init__(self, path: str | Path, backend: str = "mmap") -> None:
        self.path = Path(path)
        self.where = shown(self.path)
        self._map: mmap.mmap | None = None
        self._guard = GuardedFile(self.path, lease=backend == "mmap")
        self.size = self._guard.size
        if self._guard.leased:  # copy-on-write: writable views (numba, torch.from_numpy)
            try:
                self._map = mmap.mmap(self._guard.fd, 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):  # an empty file: the header check says what is wrong
                self._map = None

    def header(self, at: int, size: int) -> bytes:
        return pread_exact(self._guard.fd, size, at)

    def read(self, at: int, size: int, buffer: np.ndarray | None = None,
             ahead: tuple[int, int] | None = None) -> np.ndarray:
        mapping = self._map
        if mapping is not None:  # a view: no copy (it keeps the mapping alive)
            return np.ndarray((size,), dtype=np.uint8, buffer=mapping, offset=at)
        if buffer is not None and buffer.size >= size:  # a reused buffer: no allocation
            pread_into(self._guard.fd, memoryview(buffer[:size]), at)
            return buffer[:size]
        return np.frombuffer(pread_exact(self._guard.fd, size, at), dtype=np.uint8)

    def guarded(self, read: Callable[[], T], what: str) -> T:
        if self._map is not None and self._guard.lease_broken():
            self._map = None  # stop using the mapping first: the writer waits for the release
            self._guard.release()
        self._guard.check()
        try:
            value = read()
        except DoraAnalysisError:
            raise
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            self._guard.check()  # a short read because the file shrank: say that
            if not what:  # the header (the reader closes this source)
                raise CheckpointFormatError(f"{self.where}: not a readable safetensors file "
                                            f"({reason(exc)}); re-download or re-save it"
                                            ) from None
            raise CheckpointFormatError(
                f"{self.where}: cannot read {what} ({reason(exc)}); the file may "
                "be truncated or corrupt, re-download or re-save it") from None
        self._guard.check()
        return value

    def plan(self, spans: Sequence[tuple[int, int]]) -> None:
        pass  # the page cache reads ahead

    def mapped(self) -> bool:
        return self._map is not None

    def close(self) -> None:
        self._map = None  # closed when the last read using it lets go
        self._guard.close()
