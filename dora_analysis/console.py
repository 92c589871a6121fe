"""The console scripts: ``dora-analyze`` → :func:`analyze`, ``dora-train`` → :func:`train`.

They start here rather than in the command modules (:mod:`dora_analysis.cli`,
:mod:`dora_analysis.training.cli`), so that Ctrl-C while those modules (and torch)
are still importing ends the same way as at any later moment: ``error: interrupted``, exit 130.
SIGTERM and SIGHUP are turned into the same kind of exception, so that temporary files are
removed on the way out (exit 143 and 129; see :mod:`dora_analysis.exits`).

Before this module runs, the interpreter itself is starting, and nothing of ours can answer: a
Ctrl-C in its first milliseconds ends the process by the signal itself (nothing printed; the
shell still shows 130), and one while Python sets up its streams, runs ``site`` or imports this
module (a few milliseconds; this module and the package's ``__init__`` import almost nothing for
that reason) prints Python's own traceback. Nothing of ours has run by then, so nothing is left
behind either.
"""

from __future__ import annotations

import importlib

from .exits import exit_now, run

# typing.TYPE_CHECKING without importing typing (tens of ms at every start, during which a
# Ctrl-C would print a traceback); type checkers treat any TYPE_CHECKING name as true.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import NoReturn


def analyze() -> NoReturn:
    """Entry point of ``dora-analyze``: the run, then a quick exit
    (:func:`~dora_analysis.exits.exit_now`)."""
    exit_now(run(lambda: importlib.import_module("dora_analysis.cli").main))


def train() -> int:
    """Entry point of ``dora-train``."""
    return run(lambda: importlib.import_module("dora_analysis.training.cli").main)
