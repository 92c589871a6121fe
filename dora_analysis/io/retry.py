"""Retries for remote reads: transient faults (5xx, 429, resets, timeouts, short bodies) are tried
again with exponential backoff and full jitter, a bounded number of times within a bounded time.

Defaults: 4 retries (5 attempts in all), waits drawn from ``[0, 0.5·2ⁿ]`` s (at most 10 s each),
and no retry starts later than 60 s after the first fault — a few seconds of a flaky network are
absorbed, a server that stays down is reported within about a minute (plus one attempt's
timeout). A ``Retry-After`` header (429, 503) is honoured when it fits in that time. The
``--retries N`` option (``analyze(retries=N)``) or ``DORA_ANALYSIS_RETRIES`` change the count;
``DORA_ANALYSIS_RETRY_BACKOFF`` (first wait, seconds) and ``DORA_ANALYSIS_RETRY_TOTAL`` (seconds)
the times. A refused connection or an unknown host is not retried: that is a wrong address far
more often than a passing fault, and it is reported at once.
"""

from __future__ import annotations

import email.utils
import errno
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ..errors import ConfigError

T = TypeVar("T")

#: Environment variables that change the defaults.
RETRIES_ENV = "DORA_ANALYSIS_RETRIES"
BACKOFF_ENV = "DORA_ANALYSIS_RETRY_BACKOFF"
TOTAL_ENV = "DORA_ANALYSIS_RETRY_TOTAL"

#: HTTP statuses worth another try: timeouts, throttling and the server's own failures.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 507, 509, 520, 522, 524})
#: Exception type names (aiohttp, botocore, urllib3, requests) of a connection that broke mid-way.
TRANSIENT_NAMES = ("Disconnected", "Payload", "IncompleteRead", "ConnectionClosed",
                   "ProtocolError", "ChunkedEncodingError", "ConnectionReset", "ReadError")


class ShortBody(Exception):
    """A response with fewer bytes than the range asked for (a body cut mid-way)."""

    def __init__(self, got: int, wanted: int) -> None:
        super().__init__(f"got {got} bytes for a range of {wanted}")
        self.got, self.wanted = got, wanted


class Exhausted(Exception):
    """The last transient fault, after the attempts or the time ran out."""

    def __init__(self, last: BaseException, attempts: int, elapsed: float) -> None:
        super().__init__(str(last))
        self.last, self.attempts, self.elapsed = last, attempts, elapsed

    @property
    def summary(self) -> str:
        """``5 attempts in 7.1 s`` (for the one error line)."""
        return f"{self.attempts} attempt{'s' * (self.attempts != 1)} in {self.elapsed:.1f} s"


def _env_number(name: str, kind: type, default):
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if not value >= 0:
        raise ConfigError(f"{name} must be a number ≥ 0, got {text!r}")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a remote read is tried again."""

    retries: int = 4
    """Attempts after the first."""
    backoff: float = 0.5
    """Upper bound of the first wait (seconds); doubles with each retry."""
    max_backoff: float = 10.0
    """Upper bound of any one wait (seconds)."""
    total: float = 60.0
    """No retry starts later than this many seconds after the first fault."""

    def __post_init__(self) -> None:
        for name in ("retries", "backoff", "max_backoff", "total"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"retry setting {name} must be ≥ 0, got {getattr(self, name)!r}")

    @classmethod
    def resolve(cls, retries: int | None = None) -> RetryPolicy:
        """The policy for ``retries`` (None: ``DORA_ANALYSIS_RETRIES``, else the default), with the
        times from the environment.

        Example:
            >>> RetryPolicy.resolve(2).retries
            2
        """
        if retries is None:
            retries = _env_number(RETRIES_ENV, int, cls.retries)
        return cls(retries=retries, backoff=_env_number(BACKOFF_ENV, float, cls.backoff),
                   total=_env_number(TOTAL_ENV, float, cls.total))

    def call(self, attempt: Callable[[int], T], *, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> T:
        """``attempt(n)`` for n = 0, 1, … until it returns or fails for good.

        A fault that is not transient is raised as it is; the last transient one is raised as
        :class:`Exhausted` (with the number of attempts and the time they took).
        """
        started = clock()
        first_fault: float | None = None
        for n in range(self.retries + 1):
            try:
                return attempt(n)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = clock()
                first_fault = now if first_fault is None else first_fault
                wait = random.uniform(0, min(self.max_backoff, self.backoff * 2 ** n))
                asked = retry_after(exc)
                if asked is not None:
                    wait = max(wait, asked)
                if n == self.retries or now + wait > first_fault + self.total:
                    raise Exhausted(exc, n + 1, now - started) from exc
                sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes and contexts, each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an fsspec backend's exception carries, if any."""
    for e in chain(exc):
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


def is_timeout(exc: BaseException) -> bool:
    return any(isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ for e in chain(exc))


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: a transient status, a timeout, a connection broken
    mid-way or a short body — not a refused connection, an unknown host or a 4xx."""
    status = status_of(exc)
    if status is not None:
        return status in TRANSIENT_STATUSES
    for e in chain(exc):
        if isinstance(e, ConnectionRefusedError) or "DNS" in type(e).__name__:
            return False
    if is_timeout(exc):
        return True
    for e in chain(exc):
        if isinstance(e, ShortBody | ConnectionResetError | ConnectionAbortedError
                      | BrokenPipeError):
            return True
        # aiohttp's ClientOSError is an OSError carrying the reset's errno, not its subclass
        if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ECONNABORTED,
                                                  errno.EPIPE):
            return True
        if any(part in type(e).__name__ for part in TRANSIENT_NAMES):
            return True
    return False


def retry_after(exc: BaseException) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (a number or an HTTP date), if any."""
    for e in chain(exc):
        headers = getattr(e, "headers", None)
        response = getattr(e, "response", None)
        if headers is None and isinstance(response, dict):  # botocore ClientError
            headers = response.get("ResponseMetadata", {}).get("HTTPHeaders")
        elif headers is None:  # requests/httpx responses (huggingface_hub's HfHubHTTPError)
            headers = getattr(response, "headers", None)
        value = None
        if headers is not None:
            try:
                value = headers.get("Retry-After") or headers.get("retry-after")
            except AttributeError:
                value = None
        if not value:
            continue
        value = str(value).strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            continue
        return max(0.0, when.timestamp() - time.time())
    return None
