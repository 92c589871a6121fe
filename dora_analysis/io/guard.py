"""Checkpoint files that change while they are read: held still by a read lease, or caught.

A memory-mapped file that another process truncates kills the reader with ``SIGBUS`` — silently,
and no Python code can catch it. Each checkpoint file is therefore opened through a
:class:`GuardedFile`, which does two things:

* It takes a **read lease** (Linux ``fcntl(F_SETLEASE)``). While we hold it, a process that opens
  the file for writing or truncates it is made to wait by the kernel (up to
  ``/proc/sys/fs/lease-break-time``, 45 s by default) until we let go. Readers look for a pending
  break before every read and stop using the mapping *before* they release the lease, so the
  mapped pages cannot vanish under a read. A lease needs the file's owner (or ``CAP_LEASE``) and
  a local file system; where none can be had, readers read with ``pread`` instead, where a
  truncated file is a short read, not a signal.
* It compares the file's **identity** — size and modification time of the open file, device and
  inode at its path — before and after every read, so a file rewritten in place, replaced or
  deleted while it is read is reported by name instead of being read half old, half new; and,
  when it opens, with the identity the plan recorded (:mod:`.identity`), so a file that changed
  between planning and reading — on this machine or a Dask worker — is refused too.

The open itself never blocks (a FIFO or a device is refused as "not a regular file") and goes
through the descriptor, so file names that are not valid UTF-8 work as well.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
from pathlib import Path

from ..errors import CheckpointChangedError, CheckpointFormatError, CheckpointNotFoundError
from . import identity

try:
    import fcntl
except ImportError:  # Windows: no leases, identity checks only
    fcntl = None

#: The signal the kernel sends when a lease is broken. Its default disposition is "ignore": we
#: poll ``F_GETLEASE`` instead of handling it (the default, SIGIO, would end the process).
LEASE_SIGNAL = signal.SIGURG
_PROC_FD = Path("/proc/self/fd").is_dir()


def shown(path: object) -> str:
    """A path (or URL) as it may be printed: bytes that are not UTF-8 become ``\\xNN`` escapes.

    Example:
        >>> shown(os.fsdecode(b"tuned\\xff.safetensors"))
        'tuned\\\\xff.safetensors'
    """
    text = path if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def path_kind(path: str | os.PathLike) -> str | None:
    """``"file"``, ``"folder"``, ``"other"`` (FIFO, socket, device) or None when there is nothing
    there that can be reached (also for names the file system cannot hold).

    Example:
        >>> path_kind("/dev/null")
        'other'
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return None
    return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "other"


def not_found(path: str | os.PathLike) -> CheckpointNotFoundError:
    """The error for a path with nothing behind it, saying why where the system says more."""
    try:
        os.stat(path)
    except OSError as exc:
        error = open_error(Path(path), exc)
        if isinstance(error, CheckpointNotFoundError):
            return error
    except ValueError:
        pass
    return CheckpointNotFoundError(f"{shown(path)}: no such file or folder")


def open_error(path: Path, exc: OSError) -> Exception:
    """The project's error for an ``OSError`` raised while opening ``path``."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return CheckpointNotFoundError(f"{shown(path)}: no such file or folder")
    if exc.errno == errno.ENAMETOOLONG:
        return CheckpointNotFoundError(f"{shown(path)}: name too long for the file system "
                                       "(a path component over 255 bytes?); check the path")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CheckpointFormatError(f"{shown(path)}: permission denied; make it readable")
    return CheckpointFormatError(f"{shown(path)}: cannot open ({exc.strerror or exc})")


def not_regular(path: Path) -> CheckpointFormatError:
    return CheckpointFormatError(f"{shown(path)}: not a regular file (a FIFO, socket or device); "
                                 "give a checkpoint file or folder")


def _take_lease(fd: int) -> bool:
    if fcntl is None or not hasattr(fcntl, "F_SETLEASE"):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, LEASE_SIGNAL)  # before the lease: never SIGIO
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # not the owner, open for writing somewhere, a file system without leases
        return False
    return True


def pread_exact(fd: int, size: int, offset: int) -> bytearray:
    """Exactly ``size`` bytes at ``offset`` (``pread`` may return fewer than asked).

    Raises ``OSError`` at the end of the file: callers check the file's identity to tell a
    truncation from a corrupt offset.
    """
    buffer = bytearray(size)
    pread_into(fd, memoryview(buffer), offset)
    return buffer


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the bytes at ``offset``."""
    done, size = 0, len(view)
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


class GuardedFile:
    """One checkpoint file, open read-only, leased where possible, its identity checked.

    Example:
        >>> with GuardedFile(Path("model.safetensors")) as f:  # doctest: +SKIP
        ...     f.check(); data = os.pread(f.fd, 8, 0); f.check()
    """

    def __init__(self, path: str | os.PathLike, *, lease: bool = True) -> None:
        self.path = Path(path)
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise open_error(self.path, exc) from None
        opened = os.fstat(self.fd)
        if not stat.S_ISREG(opened.st_mode):
            os.close(self.fd)
            raise not_regular(self.path)
        self.size = opened.st_size
        self._identity = (opened.st_dev, opened.st_ino, opened.st_size, opened.st_mtime_ns)
        try:
            identity.opened(self.path, opened)  # the file the plan recorded, or an error
        except CheckpointChangedError:
            os.close(self.fd)
            raise
        self.leased = lease and _take_lease(self.fd)

    @property
    def open_path(self) -> str:
        """A name other libraries can open this very file by (the descriptor's, on Linux)."""
        return f"/proc/self/fd/{self.fd}" if _PROC_FD else os.fspath(self.path)

    def lease_broken(self) -> bool:
        """True once another process wants to write the file; the caller must stop using any
        mapping of it and call :meth:`release`."""
        return self.leased and fcntl.fcntl(self.fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK

    def release(self) -> None:
        """Give up the lease (a waiting writer goes on); reads continue with identity checks."""
        if self.leased:
            self.leased = False
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)

    def check(self) -> None:
        """Raise :class:`CheckpointChangedError` if the file changed since it was opened."""
        dev, ino, size, mtime = self._identity
        now = os.fstat(self.fd)
        if now.st_size != size:
            self._changed(f"its size went from {size} to {now.st_size} bytes")
        if now.st_mtime_ns != mtime:
            self._changed("it was rewritten in place")
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            self._changed("it was deleted")
        if (at_path.st_dev, at_path.st_ino) != (dev, ino):
            self._changed("another file was put in its place")

    def _changed(self, what: str) -> None:
        raise CheckpointChangedError(f"{shown(self.path)}: changed while being read ({what}); "
                                     "let whatever writes it finish, then run again")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also ends the lease
            self.fd = -1

    def __enter__(self) -> GuardedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
