"""The analysis on a Dask distributed cluster: ``analyze(..., client=Client(...))`` and
``dora-analyze ... --scheduler tcp://HOST:8786``.

The plan is made where the call is made (headers only, every problem reported at once); its
units — one matrix pair, or one row range of a pair too large for one — are sent to the workers
as plain data: the checkpoint paths, the pair, the configuration (whose block size is the
planning machine's). Each worker process opens the checkpoints itself, by the same paths
(shared storage: NFS, Lustre, a bucket mounted at the same place), and keeps what it opened for
the rest of the run. Results are gathered and assembled in the plan's order
(:class:`~dora_analysis.executors.Assembler`): the table equals a serial run's, bit for bit,
when the workers run the same torch on the same kind of CPU (torch's vectorised reductions
depend on the instruction set; ``ATEN_CPU_CAPABILITY=avx2`` pins it on mixed clusters).

A worker that dies is replaced and its units are run again by Dask (up to
``distributed.scheduler.allowed-failures`` times); an error a worker raises while reading a
checkpoint reaches the caller as the same error type, naming the worker's host.

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
import threading
import uuid
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ClusterError, ConfigError, DoraAnalysisError
from ..executors import (
    Assembler,
    MemoryBudget,
    Progress,
    Unit,
    compute_unit,
    hint,
    plan_units,
    torch_in_use,
    turns,
    unit_memory,
)

if TYPE_CHECKING:
    from ..analysis import Job, Plan
    from ..io.base import TensorSource
    from ..io.open import ReadOptions

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

    Raises :class:`ClusterError` when no scheduler answers within ``timeout`` seconds
    (default :data:`CONNECT_TIMEOUT_S`).
    """
    distributed = _distributed()
    try:
        return distributed.Client(address, timeout=timeout or CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"--scheduler {address}: no Dask scheduler answered ({exc}); start "
                           "one with `dask scheduler` and give the address it prints") from None


def _shared_path(path: Path) -> str:
    """The path as every worker must see it: absolute (workers do not share our directory)."""
    return os.path.abspath(path)


def run_dask(work: Plan, client: Any, progress: Progress | None = None) -> list[dict]:
    """Compute a plan on the cluster of ``client``; the rows of a serial run, bit for bit."""
    distributed = _distributed()
    units = plan_units(work)
    run_id = uuid.uuid4().hex
    base = _shared_path(work.base)
    # The plan goes to the cluster once, as a task that returns it rather than as scattered data:
    # a task is recomputed when the worker holding its result dies, scattered data is lost.
    shared = client.submit(_plan, work, key=f"dora-analysis-{run_id}-plan", pure=False)
    futures = client.map(
        _run_unit, units, [_shared_path(work.jobs[u.job].checkpoint.path) for u in units],
        key=[f"dora-analysis-{run_id}-{i}" for i in range(len(units))], pure=False,
        run_id=run_id, base=base, work=shared,
    )
    unit_of = {f.key: u for f, u in zip(futures, units, strict=True)}
    assembler = Assembler(work, units)
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

def _plan(work: Plan) -> Plan:
    """The plan, as a task result the units share (see :func:`run_dask`)."""
    return work


class _WorkerSources:
    """The checkpoints one worker process has open, shared by its threads, per run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple, TensorSource] = OrderedDict()
        self._users: dict[tuple, int] = {}
        self._turns: dict[tuple, threading.Lock | None] = {}
        self._shared_turns: dict[tuple, threading.Lock] = {}

    def acquire(self, run_id: str, base: str, tuned: str, job: Job, options: ReadOptions
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
                    with turn or _NO_LOCK:
                        hint(job, base_src, src)
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


def _run_unit(unit: Unit, tuned: str, *, run_id: str, base: str, work: Plan) -> Any:
    """One unit on a worker: open (or reuse) the checkpoints, compute, keep them open."""
    from ..pairs import Workspace

    workspace = _LOCAL.__dict__.setdefault("workspace", Workspace())
    try:
        with _budget().hold(unit_memory(unit, work)):
            base_key, tuned_key, base_src, tuned_src, turn = _SOURCES.acquire(
                run_id, base, tuned, work.jobs[unit.job], work.config.read_options)
            torch = torch_in_use(work.config)  # the sources are open: readers imported it
            if torch is not None:  # one thread: this unit's reductions in a serial run's order
                torch.set_num_threads(1)
            try:
                with turn or _NO_LOCK:
                    return compute_unit(unit, work, base_src, tuned_src, workspace)
            finally:
                _SOURCES.release(base_key, tuned_key)
    except DoraAnalysisError as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]} (on Dask worker {socket.gethostname()})", *exc.args[1:])
        raise
