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

**Confinement.** A checkpoint names other files — a shard index its shards, a DCP ``.metadata`` its
``.distcp`` files, DeepSpeed's ``latest`` its ``global_stepN/`` — and a folder's files are found by
their fixed names. Every such file is reached through :func:`confined` (local folders) or
:func:`confined_name` (remote folders, the same rule for the name): the name must be a plain
relative one that stays in the folder, and a local symbolic link must not lead out of it (the
Hugging Face cache's own links from ``snapshots/<rev>/`` into the repo's ``blobs/`` excepted). A
path the user gives is read wherever it leads: the user named it.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
from pathlib import Path

from ..errors import (
    CheckpointChangedError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
)
from . import identity

try:
    import fcntl
except ImportError:  # Windows: no leases, identity checks only
    fcntl = None

#: How checkpoint files are read: memory-mapped under a read lease (the pages read show in RSS as
#: shared page cache, never as private memory; files that cannot be leased are read with
#: ``pread``) or always ``pread`` into reused buffers.
IO_BACKENDS: tuple[str, ...] = ("mmap", "pread")
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


#: Characters no file name a checkpoint gives may hold: NUL, a Windows separator or drive, and
#: what a URL would read as a query, a fragment or an escape (``%2e%2e`` is ``..`` to a server).
_UNSAFE_CHARACTERS = frozenset("\0\\:?#%")


def confined_name(name: object) -> str | None:
    """Why ``name`` (a file name read from a checkpoint) may lead out of its folder, or None
    when it is a plain relative name that stays inside: not empty, not absolute, no ``..``
    component, none of NUL ``\\ : ? # %``. The one rule for local folders and remote ones.

    Example:
        >>> confined_name("model-00001-of-00002.safetensors") is None
        True
        >>> confined_name("../tuned.safetensors")
        "climbs out with '..'"
    """
    if not isinstance(name, str) or not name.strip():
        return "not a file name"
    if name.startswith("/"):
        return "an absolute path"
    if set(name) & _UNSAFE_CHARACTERS:
        return "holds one of \\ : ? # % or NUL"
    if ".." in name.split("/"):
        return "climbs out with '..'"
    return None


def _hub_blobs(folder: str) -> str | None:
    """The repo's ``blobs/`` folder when ``folder`` (resolved) lies in a Hugging Face cache
    snapshot (``…/models--org--name/snapshots/<rev>/…``), else None."""
    parts = Path(folder).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots":
            blobs = os.path.join(*parts[:i], "blobs")
            return blobs if os.path.isdir(blobs) else None
    return None


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def confined(folder: str | os.PathLike, name: object, *, named_by: object) -> Path:
    """``folder / name`` for a file that a checkpoint names (``named_by``: the file that names it,
    or the folder for a fixed name), refused unless it really lies in ``folder``.

    Refused (:class:`UnsafeCheckpointError`) are names :func:`confined_name` refuses and symbolic
    links that lead out of ``folder`` — except the Hugging Face cache's links from a snapshot into
    its repo's ``blobs/``. Nothing outside is opened or looked at, and a refusal never says
    whether the outside file exists.

    Example:
        >>> confined("ckpt", "__0_0.distcp", named_by="ckpt/.metadata")
        PosixPath('ckpt/__0_0.distcp')
    """
    why = confined_name(name)
    if why is not None:
        raise UnsafeCheckpointError(
            f"{shown(named_by)}: names {shown(name)[:120]!r} ({why}); a checkpoint may name only "
            f"files inside its folder {shown(folder)}: refused, nothing outside it is read")
    path = Path(folder) / name
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if not _within(real, root):
        blobs = _hub_blobs(root)
        if blobs is None or not _within(real, blobs):
            raise UnsafeCheckpointError(
                f"{shown(path)}: a symbolic link that leads out of the checkpoint folder "
                f"{shown(folder)}; refused (a checkpoint reads only files inside its folder): "
                "copy the file itself into the folder (cp -L)")
    return path


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
