"""The one remote byte source: a file on remote storage (``hf://``, ``s3://``, ``gs://``,
``http(s)://``) read by byte ranges through fsspec, every request retried on transient faults
(:mod:`dora_analysis.io.retry`), and errors that name the URL without credentials.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import socket
from urllib.parse import urlsplit, urlunsplit

from ..errors import (
    CheckpointChangedError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigError,
    DoraAnalysisError,
)
from .options import DEFAULT_TIMEOUT
from .refs import redact_url, remote_scheme
from .retry import Exhausted, RetryPolicy, ShortBody, chain, is_timeout, status_of

#: One request at most this large; also the most a reader holds in memory at once.
MAX_REQUEST_BYTES = 1 << 25
#: Fields of a file's info that change whenever its content does (HTTP, S3, GCS, the Hub).
CONTENT_IDS = ("ETag", "etag", "Content-MD5", "Digest", "md5Hash", "blob_id")
#: Fields of a file's info that hold its modification time.
MODIFIED = ("Last-Modified", "LastModified", "last_modified", "updated", "mtime")
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

def _scrub(text: str) -> str:
    """An exception's text without URL credentials or query strings."""
    text = re.sub(r"(\w+://)[^/\s@]*@", r"\1", text)
    return re.sub(r"\?[^\s'\"]*", "", text).splitlines()[0][:200] if text else ""


def unreachable(url: Url, exc: BaseException) -> str | None:
    """Why the server could not be reached at all, if that is what happened: fsspec's HTTP
    filesystem reports a refused connection or an unknown host as FileNotFoundError (a 404)."""
    parts = urlsplit(url.url)
    where = parts.hostname or "the server"
    try:
        where += f":{parts.port}" if parts.port else ""
    except ValueError:
        pass
    for e in chain(exc):
        if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
            return (f"connection refused by {where}; check the host and port, and that the "
                    "server is running")
        if isinstance(e, socket.gaierror) or "DNSError" in type(e).__name__:
            return f"cannot resolve the host name {parts.hostname}; check it and the network"
        if isinstance(e, ConnectionError) or "Connect" in type(e).__name__:
            return f"cannot connect to {where} ({_scrub(str(e)) or type(e).__name__})"
    return None


def remote_error(url: Url, exc: BaseException, timeout: float | None = None) -> DoraAnalysisError:
    """One clear error for a failed remote read: the URL (no credentials), the status and, after
    retries, how many attempts were made in how long."""
    if isinstance(exc, Exhausted):
        error = remote_error(url, exc.last, timeout)
        return type(error)(f"{error} ({exc.summary}; --retries or DORA_ANALYSIS_RETRIES "
                           "allows more)")
    if isinstance(exc, ShortBody):
        return CheckpointFormatError(f"{url}: {exc}; the file is truncated or changed")
    status = status_of(exc)
    if is_timeout(exc):
        after = f" after {timeout:g} s" if timeout else ""
        return CheckpointNotFoundError(f"{url}: timed out{after}; check the network or the "
                                       "server, or download the file and give its local path")
    why = unreachable(url, exc) if status is None else None
    if why:
        return CheckpointNotFoundError(f"{url}: {why}")
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
    :class:`~dora_analysis.io.retry.RetryPolicy` retries every scheme alike; the backends' own
    retries are off for https:// and s3://. huggingface_hub (hf://) and gcsfs (gs://) retry
    inside each of our attempts and offer no switch for it (``http_backoff``: up to 5 retries,
    waits of at most 8 s), so a fault that persists there takes longer to give up on.
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
    if scheme == "s3":  # one attempt per call: botocore's and s3fs's retries would multiply ours
        options["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout,
                                    "retries": {"total_max_attempts": 1}}
    fs = fsspec.filesystem(scheme, skip_instance_cache=True, **options)
    if scheme == "s3":
        fs.retries = 1
    return fs


def identity(info: dict) -> tuple:
    """What changes when a file's content does, as far as the storage tells: its size, content
    ids (ETag, hash, blob id) and modification time."""
    lfs = info.get("lfs")
    return (info.get("size"), *(info.get(f) for f in (*CONTENT_IDS, *MODIFIED)),
            lfs.get("sha256") if isinstance(lfs, dict) else None)


class RemoteFile:
    """One remote file opened for ranged reads, transient faults retried (a retry first checks
    that the file did not change); counts bytes and requests."""

    def __init__(self, url: Url, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 size: int | None = None, retry: RetryPolicy | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.retry = retry or RetryPolicy.resolve()
        self.bytes_read = 0
        self.requests = 0
        self._handle = None
        try:
            self.fs, self.fs_path = filesystem(url, token, timeout)
            info = {"size": size} if size is not None else self.retry.call(self._info)
            size = info.get("size")
            self.version = content_version(url, info)
            self._identity = identity(info) if len(info) > 1 else None
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

    def _info(self, attempt: int = 0) -> dict:
        if attempt:
            self.fs.invalidate_cache(self.fs_path)
        return self.fs.info(self.fs_path)

    def _check_unchanged(self) -> None:
        """Before a retry: the file is still the one the earlier reads came from."""
        info = self._info(attempt=1)
        if self._identity is None:  # opened with a known size: that is all there is to check
            same = info.get("size") == self.size
        else:
            same = identity(info) == self._identity
        if not same:
            raise CheckpointChangedError(f"{self.url}: changed while being read (its size, ETag "
                                         "or modification time differs); run again")

    def read(self, start: int, stop: int) -> bytes:
        """Bytes ``start:stop`` in one request (more when a transient fault is retried)."""
        if stop <= start:
            return b""

        def attempt(n: int) -> bytes:
            if n:
                self._check_unchanged()
            self.requests += 1
            self._handle.seek(start)
            data = self._handle.read(stop - start)
            self.bytes_read += len(data)
            if len(data) != stop - start:
                raise ShortBody(len(data), stop - start)
            return data

        try:
            return self.retry.call(attempt)
        except DoraAnalysisError:
            raise
        except Exception as exc:
            raise remote_error(self.url, exc, self.timeout) from None

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


def retry_policy(options) -> RetryPolicy:
    """The retries ``options`` (a :class:`~dora_analysis.io.open.ReadOptions`) ask for."""
    return RetryPolicy.resolve(getattr(options, "retries", None))
