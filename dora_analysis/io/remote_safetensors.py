"""Safetensors files on remote storage, read in place by the one safetensors reader
(:class:`~dora_analysis.io.safetensors.SafetensorsFile`) over :class:`RemoteBytes`: the header
once per version of the file, then only the rows asked for, neighbouring tensors coalesced into
one request (see :mod:`dora_analysis.io.remote`)."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from .options import DEFAULT_TIMEOUT
from .remote_file import MAX_REQUEST_BYTES, RemoteFile, Url
from .retry import RetryPolicy
from .safetensors import SafetensorsFile

log = logging.getLogger("dora_analysis")
T = TypeVar("T")

#: Unselected bytes between two selected tensors merged into one request at most.
MAX_GAP_BYTES = 1 << 20


class RemoteBytes:
    """A remote file's bytes in ranged requests (:class:`~dora_analysis.io.remote_file.
    RemoteFile`: retried, checked against changes): the planned groups of tensors in one request
    each, other reads ahead by whole rows of their tensor, up to ``max_request`` bytes."""

    thread_safe = False  # one read-ahead buffer

    def __init__(self, url: Url, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_request: int = MAX_REQUEST_BYTES, retry: RetryPolicy | None = None) -> None:
        self.url = self.path = url
        self.where = str(url)
        self._file = RemoteFile(url, token, timeout, retry=retry)
        self.size = self._file.size
        self.version = self._file.version
        self._max_request = max_request
        self._groups: list[tuple[int, int]] = []  # planned requests, sorted, disjoint
        self._buffer: tuple[int, bytes] = (0, b"")
        self.header_requests = 0

    @property
    def bytes_read(self) -> int:
        return self._file.bytes_read

    @property
    def requests(self) -> int:
        return self._file.requests

    def header(self, at: int, size: int) -> bytes:
        data = self._file.read(at, at + size)
        self.header_requests = self._file.requests
        return data

    def plan(self, spans: Sequence[tuple[int, int]]) -> None:
        """Coalesce the planned tensors' ranges: neighbours share a request when the gap of
        unselected bytes is small (≤ :data:`MAX_GAP_BYTES` and a tenth of the request)."""
        groups: list[list[int]] = []  # [start, stop, selected bytes]
        for begin, end in sorted(spans):
            last = groups[-1] if groups else None
            gap = begin - last[1] if last else 0
            if (last and end - last[0] <= self._max_request
                    and gap <= min(MAX_GAP_BYTES, (last[2] + end - begin) // 10)):
                last[1], last[2] = end, last[2] + end - begin
            else:
                groups.append([begin, end, end - begin])
        self._groups = [(g[0], g[1]) for g in groups]

    def _group_of(self, begin: int, end: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._groups, (begin, float("inf"))) - 1
        if i >= 0 and self._groups[i][0] <= begin and end <= self._groups[i][1]:
            return self._groups[i]
        return None

    def read(self, at: int, size: int, buffer: np.ndarray | None = None,
             ahead: tuple[int, int] | None = None) -> np.ndarray:
        end = at + size
        start_of, buf = self._buffer
        if not (start_of <= at and end <= start_of + len(buf)):
            start, stop = at, end
            group = self._group_of(at, end)
            if group and group[1] - group[0] <= self._max_request:
                start, stop = group
            elif ahead is not None and ahead[0]:  # whole rows of this tensor ahead
                row_bytes, tensor_end = ahead
                most = (self._max_request // row_bytes) * row_bytes
                stop = max(end, min(tensor_end, at + most))
            self._buffer = (start, b"")  # drop the old buffer before the new one arrives
            buf = self._file.read(start, stop)
            self._buffer = start_of, buf = start, buf
        view = memoryview(buf)[at - start_of:end - start_of]
        if buffer is not None and buffer.size >= size:  # a reused buffer: no allocation
            buffer[:size] = np.frombuffer(view, dtype=np.uint8)
            return buffer[:size]
        return np.frombuffer(bytearray(view), dtype=np.uint8)

    def guarded(self, read: Callable[[], T], what: str) -> T:
        return read()  # RemoteFile checks the file before every retry and words its errors

    def mapped(self) -> bool:
        return False

    def close(self) -> None:
        if self._file.requests > self.header_requests:  # not for a look at the header only
            log.info("%s: read %s in %d request(s)", self.url, _size(self._file.bytes_read),
                     self._file.requests)
        self._buffer = (0, b"")
        self._file.close()


class RemoteSafetensors(SafetensorsFile):
    """A safetensors file on remote storage: the one reader over :class:`RemoteBytes`."""

    def __init__(self, url: Url, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_request: int = MAX_REQUEST_BYTES, retry: RetryPolicy | None = None) -> None:
        self._remote = RemoteBytes(url, token, timeout, max_request, retry)
        super().__init__(self._remote)

    @property
    def bytes_read(self) -> int:
        return self._remote.bytes_read

    @property
    def requests(self) -> int:
        return self._remote.requests


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
