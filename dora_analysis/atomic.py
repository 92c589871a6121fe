"""All-or-nothing output files: every temporary file written first, then every rename, undone on
failure (SPEC §9: outputs are all-or-nothing across ``-o``, ``--summary`` and ``--html``).

1. **Write.** Each output gets a temporary file beside it with a short name (``.dora-<hex>.tmp``,
   so an output name as long as the file system allows still works), created with mode 0666
   so that the user's umask decides its permissions (``mkstemp`` would make it 0600), filled by
   its writer and flushed to disk. A failure here — disk full, permission, Ctrl-C — removes
   every temporary file: no output appears and every old file is untouched.
2. **Commit.** With SIGINT, SIGTERM and SIGHUP held back (in the main thread), each output
   that exists is first hard-linked to a backup (``.dora-<hex>.bak``), then each temporary file
   is renamed over its output. If a rename fails, or one of those signals arrived meanwhile, the
   backups are renamed back (outputs that did not exist before are removed) and only then is the
   signal let through. On success the backups are removed.

Each rename is atomic on its own: an output is always either the whole old file or the whole
new one, never half of each. What remains is the set: a SIGKILL, a crash or a power cut during
the commit (a few renames, microseconds) can leave some outputs new and others old, with the
``.dora-*`` files beside them; and a signal that arrives after the last check is acted on once
the outputs are complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError
from .io.guard import shown

PREFIX = ".dora-"
#: Signals that would end a run between two renames; held back during the commit.
HELD = frozenset(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s))
Writer = Callable[[Path], None]


@contextmanager
def signals_held() -> Iterator[Callable[[], bool]]:
    """Hold back :data:`HELD` signals; yields a function that says whether one arrived.

    Their Python handlers are swapped for one that only records them (whichever thread the
    system delivers a signal to, its Python handler runs in the main thread, so a signal mask
    would not do); on exit the old handlers come back and a recorded signal is delivered to
    them. Only the main thread can do this, and only it receives Python's signal exceptions, so
    elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    arrived: list[int] = []
    previous = {}
    for signum in HELD:
        handler = signal.getsignal(signum)
        if handler not in (signal.SIG_IGN, None):  # None: installed outside Python
            previous[signum] = handler
            signal.signal(signum, lambda n, frame: arrived.append(n))
    try:
        yield lambda: bool(arrived)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):  # once each, as a signal mask would
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)  # Ctrl-C: KeyboardInterrupt from here
            else:
                signal.raise_signal(signum)  # the default action


def _beside(path: Path, suffix: str, make: Callable[[Path], None]) -> Path:
    """A new file ``.dora-<hex><suffix>`` in ``path``'s folder, made by ``make(name)``."""
    for _ in range(64):
        name = path.parent / f"{PREFIX}{secrets.token_hex(4)}{suffix}"
        try:
            make(name)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {path.parent}")


def _create(name: Path) -> None:
    # 0o666 & ~umask, applied by the kernel, as for any file the user creates
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666))


def _fsync(path: Path, *, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _backup(target: Path) -> Path | None:
    """A hard link to the existing ``target`` (a copy where links are not supported), or None."""
    if not os.path.lexists(target):
        return None
    try:
        return _beside(target, ".bak", lambda name: os.link(target, name, follow_symlinks=False))
    except OSError:
        return _beside(target, ".bak", lambda name: shutil.copy2(target, name,
                                                                 follow_symlinks=False))


def _unlink(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def write_all(outputs: Sequence[tuple[Path, Writer]]) -> list[Path]:
    """Write every ``(path, write)`` output, or none of them; ``write(tmp)`` fills a temp file.

    Raises :class:`OutputError` (naming the file) for operating-system failures; any exception
    leaves no output and no temporary file, and every existing output unchanged.

    Example:
        >>> write_all([(Path("a.txt"), lambda p: p.write_text("a")),
        ...            (Path("b.txt"), lambda p: p.write_text("b"))])  # doctest: +SKIP
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in outputs:
            path = Path(path)
            try:
                tmp = _beside(path, ".tmp", _create)
                staged.append((tmp, path))
                write(tmp)
                _fsync(tmp)
            except OSError as exc:
                raise OutputError(f"{shown(path)}: cannot write ({exc.strerror or exc}); no "
                                  "output was written") from None
        _commit(staged)
    except BaseException:
        with signals_held():  # a second Ctrl-C must not leave temporary files behind
            for tmp, _ in staged:
                _unlink(tmp)
        raise
    for folder in {path.parent for _, path in staged}:
        try:
            _fsync(folder, folder=True)  # the renames themselves reach the disk
        except OSError:
            pass  # file systems that cannot sync a folder
    return [path for _, path in staged]


class _Interrupted(Exception):
    pass


def _commit(staged: list[tuple[Path, Path]]) -> None:
    with signals_held() as interrupted:
        backups: dict[Path, Path | None] = {}
        done: list[Path] = []
        try:
            for _, target in staged:
                backups[target] = _backup(target)
            for tmp, target in staged:
                os.replace(tmp, target)
                done.append(target)
            if interrupted():
                raise _Interrupted
        except BaseException as exc:
            for target in reversed(done):  # undo: old files back, new ones away
                if backups[target] is not None:
                    os.replace(backups.pop(target), target)
                else:
                    _unlink(target)
            for backup in backups.values():
                _unlink(backup)
            if isinstance(exc, _Interrupted):
                raise OutputError("interrupted while the outputs were put in place; none was "
                                  "written") from None
            if isinstance(exc, OSError):
                target = staged[len(done)][1] if len(done) < len(staged) else staged[-1][1]
                raise OutputError(f"{shown(target)}: cannot put in place ({exc.strerror or exc})"
                                  "; no output was changed") from None
            raise
        for backup in backups.values():
            _unlink(backup)


def atomic_write(path: str | Path, write: Writer) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A failure leaves no partial file behind and any existing ``path`` untouched.
    """
    return write_all([(Path(path), write)])[0]
