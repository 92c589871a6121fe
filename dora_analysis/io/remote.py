"""Remote checkpoints read in place through fsspec: ``hf://``, ``s3://``, ``gs://``, ``https://``.

Nothing is downloaded whole. A safetensors file is one header and one byte range per tensor, and
rows ``a:b`` of a row-major tensor are one contiguous range, so the reader fetches:

1. the header (first 16 KiB, then the rest if it is longer), validated by the one validator of
   local files too (:func:`~dora_analysis.io.safetensors_header.parse_header`: as strict as the
   ``safetensors`` library); once per version of the file in a process (the plan and the run
   both open it), where the storage names the version by its content (ETag, hash, the Hub's
   blob id);
2. only the tensors the analysis selects (``--modules``/``--include``; announced through
   :meth:`~dora_analysis.io.base.TensorSource.will_read`), neighbours coalesced into one request
   of at most :data:`MAX_REQUEST_BYTES` (a gap of unselected bytes is merged only when it is
   small: at most :data:`MAX_GAP_BYTES` and a tenth of the request), larger tensors in windows of
   that size, so memory stays bounded whatever the file size.

A folder URL resolves like a local folder: ``adapter_config.json`` (a PEFT adapter, its small
weight file read whole), ``model.safetensors``, ``model.safetensors.index.json`` (shards opened
on first use). PyTorch pickles are read whole only up to :data:`MAX_PICKLE_BYTES`.

Servers must honour HTTP ``Range``: fsspec refuses a non-range answer for any read past byte 0
(and reads only what was asked from byte 0), so a server without range support stops with an
error at the first tensor instead of starting an unbounded download.

Backends: ``hf://`` through huggingface_hub's ``HfFileSystem`` (:func:`dora_analysis.io.hub.
filesystem`; ``HF_ENDPOINT``, ``HF_TOKEN``), ``s3://`` through s3fs (extra ``[s3]``; the usual
``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for S3-compatible stores), ``gs://`` through gcsfs
(extra ``[gcs]``), ``http(s)://`` through fsspec's HTTP filesystem (extra ``[http]``, aiohttp).
Messages never show credentials (:func:`~dora_analysis.io.refs.redact_url`).
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import re
import socket
import warnings
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigError,
    DoraAnalysisError,
    SkippedFoldersWarning,
)
from .base import TensorInfo, TensorSource
from .detect import ADAPTER_WEIGHT_FILES, adapter_format
from .dtypes import DTYPES, DType, from_safetensors
from .quant import dequantized
from .refs import redact_url, remote_scheme, steps_among, unnumbered
from .safetensors_header import Entry, decode_header, header_length, parse_header
from .sharded import ShardedCheckpoint

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dora_analysis")
#: Opens the base an adapter was trained against, when the user gave one (else None).
Opened = Callable[[], "TensorSource | None"]

#: The first read: small headers fit; a longer one (a 7B shard: ~20-30 KiB) takes one more.
FIRST_READ_BYTES = 1 << 14
#: One request at most this large; also the most a reader holds in memory at once.
MAX_REQUEST_BYTES = 1 << 25
#: Unselected bytes between two selected tensors merged into one request at most.
MAX_GAP_BYTES = 1 << 20
#: Small files read whole (JSON configs, indexes).
MAX_JSON_BYTES = 64 << 20
#: PyTorch pickles cannot be read by range; read whole only up to this size.
MAX_PICKLE_BYTES = 1 << 30
#: Seconds before a connection or a read is given up (HTTP and S3).
DEFAULT_TIMEOUT = 60.0

#: Fields of a file's info that change whenever its content does (HTTP, S3, GCS, the Hub).
CONTENT_IDS = ("ETag", "etag", "Content-MD5", "Digest", "md5Hash", "blob_id")
#: Parsed safetensors headers kept per file version (the plan and the run open each file).
HEADER_CACHE_SIZE = 256
#: ... and at most this many tensors in all (a header near the 100 MB cap holds ~850 000).
HEADER_CACHE_ENTRIES = 1_000_000

#: Extras that provide each scheme's fsspec filesystem.
EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


class Url:
    """A remote location, path-like for messages: prints without credentials.

    Example:
        >>> str(Url("s3://bucket/run/") / "model.safetensors")
        's3://bucket/run/model.safetensors'
    """

    def __init__(self, url: str) -> None:
        self.url = url

    def __str__(self) -> str:
        return redact_url(self.url)

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Url) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> Url:
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/") + "/" + name
        return Url(urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")))

    @property
    def name(self) -> str:
        return urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return "." + name.rsplit(".", 1)[-1] if "." in name else ""

    @property
    def parent(self) -> Url:
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/").rsplit("/", 1)[0]
        return Url(urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")))

    @property
    def scheme(self) -> str:
        return remote_scheme(self.url) or ""


# --- errors ----------------------------------------------------------------------------------

def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(exc: BaseException) -> int | None:
    """The HTTP status an fsspec backend's exception carries, if any."""
    for e in _chain(exc):
        for value in (getattr(e, "status", None), getattr(e, "status_code", None),
                      getattr(getattr(e, "response", None), "status_code", None)):
            if isinstance(value, int):
                return value
        meta = getattr(e, "response", None)
        if isinstance(meta, dict):  # botocore ClientError
            code = meta.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
    return None


def _is_timeout(exc: BaseException) -> bool:
    return any(isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ for e in _chain(exc))


def _scrub(text: str) -> str:
    """An exception's text without URL credentials or query strings."""
    text = re.sub(r"(\w+://)[^/\s@]*@", r"\1", text)
    return re.sub(r"\?[^\s'\"]*", "", text).splitlines()[0][:200] if text else ""


def _unreachable(url: Url, exc: BaseException) -> str | None:
    """Why the server could not be reached at all, if that is what happened: fsspec's HTTP
    filesystem reports a refused connection or an unknown host as FileNotFoundError (a 404)."""
    parts = urlsplit(url.url)
    where = parts.hostname or "the server"
    try:
        where += f":{parts.port}" if parts.port else ""
    except ValueError:
        pass
    for e in _chain(exc):
        if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
            return (f"connection refused by {where}; check the host and port, and that the "
                    "server is running")
        if isinstance(e, socket.gaierror) or "DNSError" in type(e).__name__:
            return f"cannot resolve the host name {parts.hostname}; check it and the network"
        if isinstance(e, ConnectionError) or "Connect" in type(e).__name__:
            return f"cannot connect to {where} ({_scrub(str(e)) or type(e).__name__})"
    return None


def remote_error(url: Url, exc: BaseException, timeout: float | None = None) -> DoraAnalysisError:
    """One clear error for a failed remote read: the URL (no credentials) and the status."""
    status = _status(exc)
    if _is_timeout(exc):
        after = f" after {timeout:g} s" if timeout else ""
        return CheckpointNotFoundError(f"{url}: timed out{after}; check the network or the "
                                       "server, or download the file and give its local path")
    unreachable = _unreachable(url, exc) if status is None else None
    if unreachable:
        return CheckpointNotFoundError(f"{url}: {unreachable}")
    if status == 404 or (status is None and isinstance(exc, FileNotFoundError)):
        return CheckpointNotFoundError(f"{url}: not found (HTTP 404); check the bucket, "
                                       "repository, revision and path")
    if status in (401, 403) or (status is None and isinstance(exc, PermissionError)):
        return CheckpointNotFoundError(
            f"{url}: access denied (HTTP {status or 403}); check the credentials for "
            f"{url.scheme}:// (HF_TOKEN or --token, AWS_* variables, gcloud credentials) or "
            "the URL's signature")
    if isinstance(exc, ValueError) and "range" in str(exc).lower():
        return CheckpointFormatError(
            f"{url}: the server does not support HTTP range requests, so tensors cannot be read "
            "in place; download the file and give its local path")
    if status is not None:
        return CheckpointNotFoundError(f"{url}: HTTP {status} from the server")
    why = _scrub(str(exc)) or type(exc).__name__
    return CheckpointNotFoundError(f"{url}: cannot read ({type(exc).__name__}: {why})")


# --- filesystems -----------------------------------------------------------------------------

#: Environment variables that configure each scheme's filesystem (part of its cache key).
SCHEME_ENV = {"hf": ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"),
              "s3": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                     "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")}


def filesystem(url: Url, token: str | None = None, timeout: float = DEFAULT_TIMEOUT):
    """The fsspec filesystem for ``url``'s scheme and the path it takes.

    One filesystem per scheme and settings is kept for the process (creating an S3 client costs
    about a second); a change of the variables in :data:`SCHEME_ENV` makes a new one.
    """
    scheme = url.scheme
    env = tuple(os.environ.get(k) for k in SCHEME_ENV.get(scheme, ()))
    try:
        fs = _filesystem(scheme, token, timeout, env)
    except ImportError:
        raise ConfigError(f"{url}: reading {scheme}:// needs an optional dependency; install it "
                          f"with pip install 'dora-analysis[{EXTRAS.get(scheme, scheme)}]'"
                          ) from None
    path = url.url[len("hf://"):] if scheme == "hf" else url.url
    return fs, path if scheme in ("hf", "http", "https") else path.split("://", 1)[1]


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, token: str | None, timeout: float, env: tuple):
    if scheme == "hf":
        from . import hub  # the only module that imports huggingface_hub

        return hub.filesystem(token)
    import fsspec

    if scheme in ("http", "https"):
        import aiohttp

        client = {"timeout": aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)}
        return fsspec.filesystem(scheme, client_kwargs=client, skip_instance_cache=True)
    options = {}
    if scheme == "s3":
        options["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout,
                                    "retries": {"max_attempts": 2}}
    return fsspec.filesystem(scheme, skip_instance_cache=True, **options)


class RemoteFile:
    """One remote file opened for ranged reads; counts bytes and requests."""

    def __init__(self, url: Url, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 size: int | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.bytes_read = 0
        self.requests = 0
        self._handle = None
        try:
            self.fs, self.fs_path = filesystem(url, token, timeout)
            info = {"size": size} if size is not None else self.fs.info(self.fs_path)
            size = info.get("size")
            self.version = content_version(url, info)
            if size is None:
                raise CheckpointFormatError(f"{url}: the server does not report the file's size "
                                            "(no Content-Length); download the file instead")
            self.size = int(size)
            # cache_type "none": each read after a seek is exactly one ranged request.
            self._handle = self.fs.open(self.fs_path, "rb", cache_type="none", size=self.size,
                                        block_size=MAX_REQUEST_BYTES)
        except DoraAnalysisError:
            raise
        except Exception as exc:  # every backend raises its own types
            raise remote_error(url, exc, timeout) from None

    def read(self, start: int, stop: int) -> bytes:
        """Bytes ``start:stop`` in one request."""
        if stop <= start:
            return b""
        try:
            self._handle.seek(start)
            data = self._handle.read(stop - start)
        except Exception as exc:
            raise remote_error(self.url, exc, self.timeout) from None
        self.requests += 1
        self.bytes_read += len(data)
        if len(data) != stop - start:
            raise CheckpointFormatError(f"{self.url}: got {len(data)} bytes for a range of "
                                        f"{stop - start}; the file is truncated or changed")
        return data

    def read_all(self, cap: int) -> bytes:
        if self.size > cap:
            raise CheckpointFormatError(
                f"{self.url}: {self.size} bytes is more than this file type is read whole "
                f"({cap} bytes at most); download it and give its local path")
        return b"".join(self.read(a, min(self.size, a + MAX_REQUEST_BYTES))
                        for a in range(0, self.size, MAX_REQUEST_BYTES))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def content_version(url: Url, info: dict) -> tuple | None:
    """What identifies this version of the file's content (URL, size and an ETag, a hash or the
    Hub's blob id), or None when the storage reports nothing content-derived. A modification time
    is not enough: a rewrite of the same size within its resolution would go unseen."""
    for field in CONTENT_IDS:
        if info.get(field):
            return (str(url), info.get("size"), field, str(info[field]))
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):
        return (str(url), info.get("size"), "sha256", lfs["sha256"])
    return None


def series_steps(url: Url, token: str | None, timeout: float = DEFAULT_TIMEOUT
                 ) -> list[tuple[int, Url]]:
    """The ``checkpoint-N`` / ``step-N`` subfolders of a remote folder as ``(N, url)``, by step;
    empty for a file, a folder without them, or ``http(s)://`` (which has no listing).

    Example:
        >>> series_steps(Url("s3://bucket/run"), None)  # doctest: +SKIP
        [(100, Url('s3://bucket/run/checkpoint-100')), (200, Url('s3://bucket/run/checkpoint-200'))]
    """
    if _FILE_NAME.search(url.name) or url.scheme in ("http", "https"):
        return []
    fs, path = filesystem(url, token, timeout)
    try:
        fs.invalidate_cache(path)  # a run still training gains folders: never a stale listing
        entries = fs.ls(path, detail=True)
    except Exception as exc:
        if _absent(url, exc):
            return []
        raise remote_error(url, exc, timeout) from None
    names = sorted(PurePosixPath(str(e["name"]).rstrip("/")).name for e in entries
                   if e.get("type") == "directory")
    skipped = unnumbered(names)
    if skipped:
        warnings.warn(f"{url}: subfolder(s) {', '.join(skipped)} skipped: a step of a series is "
                      "named checkpoint-N or step-N with N a number", SkippedFoldersWarning,
                      stacklevel=2)
    return steps_among(url, ((name, url / name) for name in names))


def exists(url: Url, token: str | None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether ``url`` names a file (``False`` for a 404)."""
    fs, path = filesystem(url, token, timeout)
    try:  # not fs.isfile: it answers False for a server that cannot be reached
        return fs.info(path).get("type") == "file"
    except Exception as exc:
        if _absent(url, exc):
            return False
        raise remote_error(url, exc, timeout) from None


def _absent(url: Url, exc: BaseException) -> bool:
    """A genuine "no such file" (HTTP 404), not a server that could not be reached."""
    status = _status(exc)
    return status == 404 or (status is None and isinstance(exc, FileNotFoundError)
                             and not _is_timeout(exc) and _unreachable(url, exc) is None)


# --- safetensors ------------------------------------------------------------------------------

#: file version (:func:`content_version`) → (data start, parsed header); oldest dropped first.
_HEADERS: dict[tuple, tuple[int, dict[str, Entry]]] = {}


class RemoteSafetensors(TensorSource):
    """A safetensors file on remote storage: header, then only the rows asked for."""

    def __init__(self, url: Url, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_request: int = MAX_REQUEST_BYTES) -> None:
        self.path = url
        self._file = RemoteFile(url, token, timeout)
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


# --- opening a remote reference ---------------------------------------------------------------

def _read_json(url: Url, token: str | None, timeout: float) -> bytes:
    """A small JSON file's bytes, parsed by the same function as a local file's (no decoding
    here: a BOM or invalid UTF-8 gets the same verdict wherever the file lies)."""
    f = RemoteFile(url, token, timeout)
    try:
        return f.read_all(MAX_JSON_BYTES)
    finally:
        f.close()


def _load_tensors(url: Url, token: str | None, timeout: float) -> dict[str, torch.Tensor]:
    """All tensors of a small remote file (an adapter), read whole."""
    import torch

    if url.suffix == ".safetensors":
        with RemoteSafetensors(url, token, timeout) as src:
            src.will_read(src.keys())
            return {n: src.get_tensor(n) for n in src.keys()}
    f = RemoteFile(url, token, timeout)
    try:
        data = f.read_all(MAX_PICKLE_BYTES)
    finally:
        f.close()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointFormatError(f"{url}: not a weights-only PyTorch state dict "
                                    f"({type(exc).__name__}); it is never unpickled") from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{url}: not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _adapter_as_base(url: Url) -> CheckpointFormatError:
    return CheckpointFormatError(f"{url}: is an adapter, not a base model; give the pre-trained "
                                 "weights as BASE and the adapter as TUNED")


def _open_peft(folder: Url, options, base: TensorSource | None, adapter_base: Opened
               ) -> TensorSource:
    if base is None:
        raise _adapter_as_base(folder)
    from .adapters import parse_config, peft_adapter
    from .merge import AdapterSource

    config = parse_config(_read_json(folder / "adapter_config.json", options.token,
                                     options.timeout), folder / "adapter_config.json")
    for name in ADAPTER_WEIGHT_FILES:
        weights = folder / name
        if exists(weights, options.token, options.timeout):
            tensors = _load_tensors(weights, options.token, options.timeout)
            adapter = peft_adapter(config, tensors, folder, weights,
                                   adapter_base_given=options.adapter_base is not None)
            return AdapterSource(adapter, base, trained_on=adapter_base())
    raise CheckpointFormatError(f"{folder}: adapter folder without weights (expected one of "
                                f"{', '.join(ADAPTER_WEIGHT_FILES)})")


def _open_file(url: Url, options, base: TensorSource | None, adapter_base: Opened
               ) -> TensorSource:
    token, timeout = options.token, options.timeout
    if url.name.endswith(".safetensors.index.json"):
        text = _read_json(url, token, timeout)
        return dequantized(ShardedCheckpoint(
            url, lambda shard: RemoteSafetensors(shard, token, timeout), text=text))
    if url.suffix == ".safetensors":
        src = RemoteSafetensors(url, token, timeout)
        if adapter_format(src.keys()) is None:
            return dequantized(src)
        src.close()
    elif url.suffix not in (".bin", ".pt", ".pth"):
        raise CheckpointFormatError(f"{url}: unknown remote checkpoint type (expected "
                                    ".safetensors, .safetensors.index.json, or a folder)")
    tensors = _load_tensors(url, token, timeout)
    if adapter_format(list(tensors)) is None:
        if url.suffix != ".safetensors":
            raise CheckpointFormatError(
                f"{url}: PyTorch pickles cannot be read in place (no ranges); download the "
                "file, or convert it to safetensors")
    if base is None:
        raise _adapter_as_base(url)
    from .adapters import read_adapter_file
    from .merge import AdapterSource

    adapter = read_adapter_file(url, tensors, lora_alpha=options.lora_alpha)
    return AdapterSource(adapter, base, trained_on=adapter_base())



#: Files that make a remote folder a checkpoint, in order of preference.
REMOTE_FOLDER_FILES = ("adapter_config.json", "model.safetensors", "model.safetensors.index.json")
_FILE_NAME = re.compile(r"\.(safetensors|json|bin|pt|pth)$")


def open_remote(url: Url, options, base: TensorSource | None = None,
                adapter_base: Opened = lambda: None) -> TensorSource:
    """Open a remote file or folder lazily (``options``: a :class:`~dora_analysis.io.open.
    ReadOptions`); an adapter is merged with ``base`` as it is read, or with ``adapter_base()``
    (the base it was trained against) when that is not None.

    Example:
        >>> open_remote(Url("s3://bucket/model.safetensors"), ReadOptions())  # doctest: +SKIP
    """
    if _FILE_NAME.search(url.name):
        return _open_file(url, options, base, adapter_base)
    for name in REMOTE_FOLDER_FILES:
        if exists(url / name, options.token, options.timeout):
            if name == "adapter_config.json":
                return _open_peft(url, options, base, adapter_base)
            return _open_file(url / name, options, base, adapter_base)
    raise CheckpointNotFoundError(
        f"{url}: no checkpoint found (looked for {', '.join(REMOTE_FOLDER_FILES)}); give the "
        "URL of the .safetensors file itself")
