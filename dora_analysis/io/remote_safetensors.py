"""Safetensors files on remote storage, read in place: the header once, then only the rows asked
for, neighbouring tensors coalesced into one request (see :mod:`dora_analysis.io.remote`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CheckpointFormatError, DoraAnalysisError
from .base import TensorInfo, TensorSource
from .dtypes import DTYPES, DType, from_safetensors
from .options import DEFAULT_TIMEOUT
from .remote_file import MAX_REQUEST_BYTES, RemoteFile, Url
from .retry import RetryPolicy
from .safetensors_header import Entry, decode_header, header_length, parse_header

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dora_analysis")

#: The first read: small headers fit; a longer one (a 7B shard: ~20-30 KiB) takes one more.
FIRST_READ_BYTES = 1 << 14
#: Unselected bytes between two selected tensors merged into one request at most.
MAX_GAP_BYTES = 1 << 20
#: Parsed safetensors headers kept per file version (the plan and the run open each file).
HEADER_CACHE_SIZE = 256
#: ... and at most this many tensors in all (a header near the 100 MB cap holds ~850 000).
HEADER_CACHE_ENTRIES = 1_000_000


#: file version (:func:`content_version`) → (data start, parsed header); oldest dropped first.
_HEADERS: dict[tuple, tuple[int, dict[str, Entry]]] = {}


def forget_headers() -> None:
    """Drop the parsed headers kept for files opened before (tests measure first reads)."""
    _HEADERS.clear()


class RemoteSafetensors(TensorSource):
    """A safetensors file on remote storage: header, then only the rows asked for."""

    def __init__(self, url: Url, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_request: int = MAX_REQUEST_BYTES, retry: RetryPolicy | None = None) -> None:
        self.path = url
        self._file = RemoteFile(url, token, timeout, retry=retry)
        self._max_request = max_request
        self._groups: dict[str, tuple[int, int]] = {}  # planned tensor → its request's range
        self._buffer: tuple[int, bytes] = (0, b"")
        self._current = ""  # the tensor being read: read-ahead stays within it or its group
        try:
            self._read_header()
        except DoraAnalysisError:
            self._file.close()
            raise

    def _read_header(self) -> None:
        version = self._file.version
        if version is not None and version in _HEADERS:  # opened before: same bytes, same header
            self._data_start, self._entries = _HEADERS[version]
            self._header_requests = self._file.requests
            return
        size = self._file.size
        first = self._file.read(0, min(size, FIRST_READ_BYTES))
        n = header_length(first, size, self.path)
        # a long header in one more request of its own: never two copies of it at once
        raw = first[8:8 + n] if 8 + n <= len(first) else self._file.read(8, 8 + n)
        del first
        text = decode_header(raw, self.path)
        del raw
        self._data_start = 8 + n
        self._header_requests = self._file.requests
        self._entries = parse_header(text, size - self._data_start, self.path)
        del text
        if version is not None:
            _HEADERS[version] = (self._data_start, self._entries)
            while len(_HEADERS) > HEADER_CACHE_SIZE or (
                    len(_HEADERS) > 1 and sum(len(e) for _, e in _HEADERS.values())
                    > HEADER_CACHE_ENTRIES):  # oldest first; the newest is always kept
                _HEADERS.pop(next(iter(_HEADERS)), None)

    @property
    def bytes_read(self) -> int:
        return self._file.bytes_read

    @property
    def requests(self) -> int:
        return self._file.requests

    def keys(self) -> list[str]:
        return sorted(self._entries)  # as safetensors lists them, and the local reader

    def info(self, name: str) -> TensorInfo:
        e = self._entries[name]
        return TensorInfo(e.shape, from_safetensors(e.dtype))

    def _dtype(self, name: str) -> DType:
        dtype = DTYPES.get(from_safetensors(self._entries[name].dtype))
        if dtype is None:
            raise CheckpointFormatError(f"{self.path}: tensor '{name}' is stored as "
                                        f"{self._entries[name].dtype}, which torch cannot read")
        return dtype

    def will_read(self, names: Sequence[str]) -> None:
        """Plan coalesced requests for these tensors (neighbours in the file share one)."""
        chosen = sorted((self._entries[n].begin, self._entries[n].end, n)
                        for n in dict.fromkeys(names) if n in self._entries)
        groups: list[list] = []  # [start, stop, selected bytes, names]
        for begin, end, name in chosen:
            last = groups[-1] if groups else None
            gap = begin - last[1] if last else 0
            if (last and end - last[0] <= self._max_request
                    and gap <= min(MAX_GAP_BYTES, (last[2] + end - begin) // 10)):
                last[1], last[2] = end, last[2] + end - begin
                last[3].append(name)
            else:
                groups.append([begin, end, end - begin, [name]])
        self._groups = {n: (g[0], g[1]) for g in groups for n in g[3]}

    def _fetch(self, begin: int, end: int) -> memoryview:
        """Data bytes ``begin:end`` (relative to the data start), from the buffer or one request
        that also covers what is read next (the planned group, or the tensor's next rows)."""
        at, buf = self._buffer
        if not (at <= begin and end <= at + len(buf)):
            start, stop = begin, end
            group = self._groups.get(self._current)
            entry = self._entries[self._current]
            if group and group[0] <= begin and end <= group[1] and group[1] - group[0] <= \
                    self._max_request:
                start, stop = group
            elif entry.row_bytes:  # read ahead whole rows of this tensor, within the cap
                ahead = (self._max_request // entry.row_bytes) * entry.row_bytes
                stop = max(end, min(entry.end, begin + ahead))
            self._buffer = (start, b"")  # drop the old buffer before the new one arrives
            buf = self._file.read(self._data_start + start, self._data_start + stop)
            self._buffer = at, buf = start, buf
        return memoryview(buf)[begin - at:end - at]

    def _rows(self, name: str, start: int, stop: int, expert: int | None
              ) -> tuple[memoryview, tuple[int, ...]]:
        """The bytes of rows ``start:stop`` (of expert ``expert``) and the shape of one row."""
        e = self._entries[name]
        shape, first, row = e.shape, e.begin, e.row_bytes
        if expert is not None:  # (E, out, in): expert e's rows follow each other
            shape, first, row = shape[1:], e.begin + expert * e.row_bytes, e.row_bytes // shape[1]
        start, stop = max(0, start), max(start, min(stop, shape[0]))
        self._current = name
        return self._fetch(first + start * row, first + stop * row), shape[1:]

    def _tensor(self, name: str, data: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        dtype = self._dtype(name).torch()
        if not len(data):
            return torch.empty((0, *shape), dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(-1, *shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if not self._entries[name].shape:
            return self.get_tensor(name)
        return self._tensor(name, *self._rows(name, start, stop, None))

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        return self._tensor(name, *self._rows(name, start, stop, expert))

    def read_rows(self, name: str, start: int, stop: int, *, expert: int | None = None,
                  buffer: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        dtype = self._dtype(name)
        if dtype.numpy is None or not self._entries[name].shape:
            return super().read_rows(name, start, stop, expert=expert, buffer=buffer)
        data, shape = self._rows(name, start, stop, expert)
        if buffer is not None and buffer.size >= len(data):  # a reused buffer: no allocation
            raw = buffer[:len(data)]
            raw[:] = np.frombuffer(data, dtype=np.uint8)
        else:
            raw = np.frombuffer(bytearray(data), dtype=np.uint8)
        return raw.view(dtype.numpy).reshape(-1, *shape)

    def get_tensor(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        if e.shape:
            return self.get_rows(name, 0, e.shape[0]).reshape(e.shape)
        self._current = name
        return self._tensor(name, self._fetch(e.begin, e.end), ()).reshape(())

    def close(self) -> None:
        if self._file.requests > self._header_requests:  # not for a look at the header only
            log.info("%s: read %s in %d request(s)", self.path, _size(self._file.bytes_read),
                     self._file.requests)
        self._buffer = (0, b"")
        self._file.close()


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
