"""The analysis on a Dask distributed cluster: ``analyze(..., client=Client(...))`` and
``dora-analyze ... --scheduler tcp://HOST:8786``.

The plan is made where the call is made (headers only, every problem reported at once); its
units — one matrix pair, or one row range of a pair too large for one — are sent to the workers
as independent tasks carrying only what they need, as plain data (:class:`UnitTask`: the
checkpoint paths, the pair, the configuration — whose block size is the planning machine's —
and the identity planning recorded for each file). No task depends on another's result, so the
scheduler spreads them over every worker (it kept them all where a shared plan result lived)
and reruns a dead worker's units anywhere. Each worker process opens the checkpoints itself, by
the same paths (shared storage: NFS, Lustre, a bucket mounted at the same place), checks that
each file is the one planned (:mod:`dora_analysis.io.identity`), and keeps what it opened for
the rest of the run. Results are gathered and assembled in the plan's order
(:class:`~dora_analysis.executors.Assembler`): the table equals a serial run's, bit for bit,
when the workers run the same torch on the same kind of CPU (torch's vectorised reductions
depend on the instruction set; ``ATEN_CPU_CAPABILITY=avx2`` pins it on mixed clusters).

A worker that dies is replaced and its units are run again by Dask (up to
``distributed.scheduler.allowed-failures`` times); an error a worker raises while reading a
checkpoint — a file it cannot see, or one that is not the file planned — reaches the caller as
the same error type, naming the worker's host.

``--scheduler`` is probed before a client is made: a Dask scheduler sends its handshake as soon
as a connection opens, so a service that is not one (an SSH server's banner, an HTTP server's
silence) is one error within :data:`CONNECT_TIMEOUT_S`, not a 2.8 EiB allocation or a hang.

Start a cluster (see docs/performance.md for SLURM and Kubernetes)::

    dask scheduler                      # prints tcp://HOST:8786
    dask worker tcp://HOST:8786 --nworkers 4 --nthreads 1
    dora-analyze base/ tuned/ --scheduler tcp://HOST:8786 -o table.csv

Example:
    >>> from distributed import Client  # doctest: +SKIP
    >>> table = analyze("base/", "run/", client=Client("tcp://HOST:8786"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError, ClusterError, ConfigError, DoraAnalysisError
from ..executors import (
    Assembler,
    MemoryBudget,
    PairCallback,
    Progress,
    compute,
    pair_memory,
    plan_units,
    torch_in_use,
    turns,
)

if TYPE_CHECKING:
    from ..analysis import Plan
    from ..config import AnalysisConfig
    from ..io.base import TensorSource
    from ..io.identity import FileIdentity
    from ..io.open import ReadOptions
    from ..pairs import MatrixPair

#: Seconds to wait for the scheduler named by ``--scheduler``.
CONNECT_TIMEOUT_S = 10
#: Sources a worker process keeps open when no unit uses them (older runs' are closed first).
IDLE_SOURCES = 4

INSTALL = "pip install 'dora-analysis[dask]'"


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ConfigError(f"the Dask executor needs dask[distributed]: {INSTALL}") from None
    return distributed


def connect(address: str, timeout: float | None = None) -> Any:
    """A ``distributed.Client`` for the scheduler at ``address`` (``tcp://HOST:8786``).

    Raises :class:`ClusterError` when no Dask scheduler answers within ``timeout`` seconds
    (default :data:`CONNECT_TIMEOUT_S`), including when something else does.
    """
    distributed = _distributed()
    timeout = timeout or CONNECT_TIMEOUT_S
    probe(address, timeout)
    try:
        return distributed.Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"--scheduler {address}: no Dask scheduler answered ({exc}); start "
                           "one with `dask scheduler` and give the address it prints") from None


#: The port a Dask scheduler listens on when the address names none.
DEFAULT_PORT = 8786
#: A Dask handshake is a few hundred bytes; a length prefix beyond this is not Dask talking.
MAX_HANDSHAKE_BYTES = 1 << 20


def probe(address: str, timeout: float) -> None:
    """Check that a ``tcp://`` address is a Dask scheduler: it sends a handshake — an 8-byte
    frame length, then that many bytes — as soon as a connection opens. Other schemes (TLS,
    in-process) are left to the client. Raises :class:`ClusterError`."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "tcp":
        return
    rest = rest if sep else address
    host, colon, port = rest.rpartition(":")
    if not colon or rest.endswith("]"):  # no port: Dask's default
        host, port = rest, str(DEFAULT_PORT)
    host = host.strip("[]") or "127.0.0.1"
    advice = "start one with `dask scheduler` and give the address it prints"
    try:
        port_number = int(port)
        with socket.create_connection((host, port_number), timeout=timeout) as sock:
            deadline = time.monotonic() + timeout
            head = _receive(sock, 8, deadline)
            (size,) = struct.unpack("<Q", head)
            if not 0 < size <= MAX_HANDSHAKE_BYTES:
                what = head.split(b"\n")[0].decode("ascii", "replace").strip()
                raise ClusterError(f"--scheduler {address}: not a Dask scheduler (it answered "
                                   f"{what!r}…); {advice}")
            _receive(sock, size, deadline)
    except ClusterError:
        raise
    except ValueError:
        raise ClusterError(f"--scheduler {address}: not an address (tcp://HOST:PORT)") from None
    except TimeoutError:
        raise ClusterError(f"--scheduler {address}: no Dask handshake within {timeout:g} s (is "
                           f"it another kind of server, e.g. HTTP?); {advice}") from None
    except OSError as exc:
        raise ClusterError(f"--scheduler {address}: no Dask scheduler answered "
                           f"({exc.strerror or exc}); {advice}") from None


def _receive(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the connection closed during the handshake")
        data += chunk
    return data


def _shared_path(path: Path) -> str:
    """The path as every worker must see it: absolute (workers do not share our directory)."""
    return os.path.abspath(path)


@dataclass(frozen=True)
class UnitTask:
    """Everything one unit needs on a worker, as plain data (no shared future)."""

    run_id: str
    base: str
    tuned: str
    pair: MatrixPair
    rows: tuple[int, int] | None
    """A piece's stored rows, or None for the whole pair (see :class:`~..executors.Unit`)."""
    config: AnalysisConfig
    files: tuple[tuple[str, FileIdentity], ...]
    """The identity planning recorded for each file the unit may open."""


def run_dask(work: Plan, client: Any, progress: Progress | None = None, *,
             known: Mapping[tuple[int, int], Any] | None = None,
             on_pair: PairCallback | None = None) -> list[dict]:
    """Compute a plan on the cluster of ``client``; the rows of a serial run, bit for bit. The
    pairs in ``known`` are not computed; ``on_pair`` gets each computed one, on this machine
    (see :class:`~dora_analysis.executors.Assembler`)."""
    distributed = _distributed()
    units = plan_units(work, known or {})
    if not units:  # every pair known: nothing to send
        return Assembler(work, units, known).records()
    run_id = uuid.uuid4().hex
    base = _shared_path(work.base)
    files = {j: tuple(work.files(j).items()) for j in range(len(work.jobs))}
    tasks = [UnitTask(run_id, base, _shared_path(work.jobs[u.job].checkpoint.path),
                      u.pair_of(work), u.rows, work.config, files[u.job]) for u in units]
    futures = client.map(_run_unit, tasks, pure=False,
                         key=[f"dora-analysis-{run_id}-{i}" for i in range(len(units))])
    unit_of = {f.key: u for f, u in zip(futures, units, strict=True)}
    assembler = Assembler(work, units, known, on_pair)
    try:
        for future in distributed.as_completed(futures):
            unit = unit_of[future.key]
            assembler.add(unit, future.result())
            if progress is not None:
                progress(unit.numel(work))
    except DoraAnalysisError:
        raise
    except distributed.KilledWorker as exc:
        raise ClusterError(f"Dask workers died running {exc.task!r} again and again (out of "
                           "memory? the worker logs say why)") from None
    except (OSError, TimeoutError, distributed.client.FutureCancelledError) as exc:
        raise ClusterError(f"the Dask cluster stopped answering ({exc})") from None
    finally:
        client.cancel([f for f in futures if not f.done()])
    return assembler.records()


# --- on the workers ---------------------------------------------------------------------------

class _WorkerSources:
    """The checkpoints one worker process has open, shared by its threads, per run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple, TensorSource] = OrderedDict()
        self._users: dict[tuple, int] = {}
        self._turns: dict[tuple, threading.Lock | None] = {}
        self._shared_turns: dict[tuple, threading.Lock] = {}

    def acquire(self, run_id: str, base: str, tuned: str, options: ReadOptions
                ) -> tuple[tuple, tuple, TensorSource, TensorSource, threading.Lock | None]:
        """The job's sources (opened on first use), and the lock its unit must read under."""
        from ..io.open import open_checkpoint

        base_key = (run_id, "base", base, options)
        tuned_key = (run_id, "tuned", tuned, base, options)
        with self._lock:
            if base_key not in self._open:
                self._open[base_key] = open_checkpoint(base, options)
                self._shared_turns[base_key] = threading.Lock()
            self._users[base_key] = self._users.get(base_key, 0) + 1
            base_src = self._open[base_key]
            try:
                if tuned_key not in self._open:
                    src = open_checkpoint(tuned, options, base=base_src)
                    turn = turns(base_src, src, self._shared_turns[base_key], threading.Lock)
                    self._open[tuned_key], self._turns[tuned_key] = src, turn
            except BaseException:
                self._release(base_key)
                raise
            self._users[tuned_key] = self._users.get(tuned_key, 0) + 1
            self._open.move_to_end(tuned_key)
            return (base_key, tuned_key, base_src, self._open[tuned_key],
                    self._turns[tuned_key])

    def release(self, *keys: tuple) -> None:
        with self._lock:
            for key in keys:
                self._release(key)
            idle = [k for k in self._open if not self._users.get(k)]
            # tuned sources (they may hold their base) before bases, oldest first
            idle.sort(key=lambda k: k[1] == "base")
            for key in idle[: max(0, len(idle) - IDLE_SOURCES)]:
                self._open.pop(key).close()
                self._turns.pop(key, None)
                self._shared_turns.pop(key, None)

    def _release(self, key: tuple) -> None:
        self._users[key] -= 1
        if not self._users[key]:
            del self._users[key]


_NO_LOCK = nullcontext()
_SOURCES = _WorkerSources()
_BUDGET: MemoryBudget | None = None
_BUDGET_LOCK = threading.Lock()


def _budget() -> MemoryBudget:
    global _BUDGET
    with _BUDGET_LOCK:
        if _BUDGET is None:
            from ..hardware import memory_available

            _BUDGET = MemoryBudget(memory_available() // 2)
        return _BUDGET


_LOCAL = threading.local()


def _run_unit(task: UnitTask) -> Any:
    """One unit on a worker: open (or reuse) the checkpoints, check they are the files planned,
    compute, keep them open."""
    from ..io.identity import expecting
    from ..pairs import Workspace

    workspace = _LOCAL.__dict__.setdefault("workspace", Workspace())
    options = task.config.read_options
    try:
        with _budget().hold(pair_memory(task.pair, task.config)), expecting(dict(task.files)):
            base_key, tuned_key, base_src, tuned_src, turn = _SOURCES.acquire(
                task.run_id, task.base, task.tuned, options)
            torch = torch_in_use(task.config)  # the sources are open: readers imported it
            if torch is not None:  # one thread: this unit's reductions in a serial run's order
                torch.set_num_threads(1)
            try:
                with turn or _NO_LOCK:
                    # Remote readers fetch this unit's tensors only: each worker reads its own.
                    base_src.will_read([task.pair.name])
                    tuned_src.will_read([task.pair.tuned_name])
                    return compute(task.pair, task.rows, task.config, base_src, tuned_src,
                                   workspace)
            finally:
                _SOURCES.release(base_key, tuned_key)
    except DoraAnalysisError as exc:
        if exc.args and isinstance(exc.args[0], str):
            where = f" (on Dask worker {socket.gethostname()})"
            if isinstance(exc, CheckpointNotFoundError):
                where += ("; every Dask worker reads the checkpoints at the paths the planning "
                          "machine sees: put them on storage all workers share, at the same path")
            exc.args = (f"{exc.args[0]}{where}", *exc.args[1:])
        raise
