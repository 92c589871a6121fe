"""What the two command lines share: every mistake is one ``error: …`` line, an interrupt is one
line with the usual exit code, and file names print whatever bytes they hold.

:func:`run` turns SIGTERM and SIGHUP into the same kind of exception as Ctrl-C, so that
temporary files are removed on the way out (exit 143 and 129, 130 for Ctrl-C). The console
scripts (:mod:`dora_analysis.console`) and the command modules (:mod:`dora_analysis.cli`,
:mod:`dora_analysis.training.cli`) both use it; it imports nothing of ours and almost nothing
else, since it is imported first at every start.
"""

from __future__ import annotations

import os
import signal
import sys

# typing.TYPE_CHECKING without importing typing (tens of ms at every start, during which a
# Ctrl-C would print a traceback); type checkers treat any TYPE_CHECKING name as true.
TYPE_CHECKING = False

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import NoReturn


def parser(**kwargs) -> argparse.ArgumentParser:
    """An ``argparse.ArgumentParser`` whose usage errors are one ``error: …`` line and exit 2,
    like every other error.

    Example:
        >>> parser(prog="dora-analyze").parse_args(["--nope"])  # doctest: +SKIP
        error: unrecognized arguments: --nope (see dora-analyze --help)
    """
    import argparse  # here: this module is imported first at every start, and must be quick

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            self.exit(2, f"error: {printable(message)} (see {self.prog} --help)\n")

    return Parser(**kwargs)


def printable(text: object) -> str:
    """``str(text)`` with bytes of file names that are not UTF-8 shown as ``\\xNN``."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def say(text: str) -> None:
    """One line on stderr, even when stderr is gone (a closed terminal after SIGHUP)."""
    try:
        print(printable(text), file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: The signals our handlers received in this run, oldest first (see :func:`raise_if_signalled`).
RECEIVED: list[int] = []


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _on_signal(signum: int, frame: object) -> None:
    RECEIVED.append(signum)
    raise _interrupt(signum)


def raise_if_signalled() -> None:
    """Raise the interrupt of a signal received earlier, once more.

    Python swallows an exception raised by a signal handler while a finalizer (``__del__``, a
    weakref callback) runs — it prints "Exception ignored" and goes on — so a Ctrl-C could be
    lost in a long loop. The loops that run for hours (training steps) call this between units
    of work. Outside the console scripts nothing is recorded, and this does nothing.
    """
    if RECEIVED:
        raise _interrupt(RECEIVED[-1])


def interrupted(exc: KeyboardInterrupt, hint: str = "") -> int:
    """Report an interrupt on one line (``hint``: what the user can do next, appended); the exit
    code the shell uses for that signal."""
    signum = getattr(exc, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    what = "error: interrupted" if signum == signal.SIGINT else f"error: terminated ({name})"
    say(f"{what}; {hint}" if hint else what)
    return 128 + signum


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The interrupt that caused ``exc``, if any: a signal that lands inside a class body or an
    import is re-raised by Python wrapped in another error (``Error calling __set_name__``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run(load_main: Callable[[], Callable[[], int]]) -> int:
    """Import a command's ``main`` (``load_main()``) and run it, interrupts reported on one line."""
    RECEIVED.clear()
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        # an ignored signal stays ignored: `nohup` ignores SIGHUP, and a shell's `cmd &` SIGINT
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) != signal.SIG_IGN:
            signal.signal(getattr(signal, name), _on_signal)
    try:
        code = load_main()()
        sys.stdout.flush()  # here, not at exit, where a closed pipe would print a traceback
        return code
    except KeyboardInterrupt as exc:
        return interrupted(exc)
    except BrokenPipeError:  # `dora-analyze … | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        interrupt = _interrupt_behind(exc)
        if interrupt is None:
            raise
        return interrupted(interrupt)
    finally:  # the run is over: a late Ctrl-C must not interrupt the interpreter's shutdown
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once the run is over and every output is closed.

    The exit handlers registered with :mod:`atexit` run (logging, temporary folders), then the
    process ends without the interpreter's module-by-module teardown, which takes 0.6–0.9 s
    once torch is imported — a quarter of a ``dora-analyze`` run on a small model. Nothing of
    ours is open by then: outputs are written and renamed, worker threads joined, Dask clients
    closed. Only ``dora-analyze`` does this; ``dora-train`` (process groups, CUDA) exits normally.
    """
    import atexit

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left, or a closed stream: nothing to save
            pass
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_handlers is None:  # not CPython: leave it to the interpreter
        sys.exit(code)
    run_handlers()
    os._exit(code)
