"""Who computes a plan: this process, on every core (threads), or a Dask cluster.

A :class:`~dora_analysis.analysis.Plan` is cut into :class:`Unit` s: one matrix pair, or — for a
pair larger than one piece (:func:`~dora_analysis.pairs.pieces`) whose metrics all come from the
streaming pass — one row range of it. Every unit is computed by the same code, with the block
size fixed in the plan's configuration and one torch thread, so its bits do not depend on which
worker, thread or machine computed it. Results come back in any order; :class:`Assembler` puts
them in the plan's order on the caller's thread, merges pieces, emits the warnings and builds the
rows: the table is bitwise the one of a serial run, row for row.

Readers: a source that declares itself :attr:`~dora_analysis.io.base.TensorSource.thread_safe`
(local safetensors and torch files) is read by all workers at once; the units of any other
(remote storage, DCP, DeepSpeed) take turns, one at a time and in table order (:class:`InOrder`),
while units of other jobs go on.

Memory: each worker holds one :class:`~dora_analysis.pairs.Workspace` (two read buffers of one
block, sized to its share of the cache) where rows are copied; memory-mapped rows are read in
place.
Metrics that hold whole matrices (cost ``dense``/``svd``) draw on one :class:`MemoryBudget` per
process — half the memory available when the run starts — so that several workers never hold
more dense matrices at once than it allows; a unit larger than the whole budget runs alone.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import metrics as registry
from .hardware import memory_available, usable_cpus

if TYPE_CHECKING:
    from .analysis import Job, Plan
    from .config import AnalysisConfig
    from .decompose import VectorSums
    from .io.base import TensorSource
    from .pairs import MatrixPair, Workspace

Progress = Callable[[int], object]
#: Called with ``(job, pair, values)`` once a pair's values are computed (see :class:`Assembler`).
PairCallback = Callable[[int, int, Any], object]
_NO_LOCK = nullcontext()

#: Float64 matrices a dense metric may hold per element of its pair (W0, Wt, ΔW), and the extra
#: an SVD needs for its factors and workspace.
DENSE_BYTES_PER_ELEMENT = {"stream": 0, "dense": 3 * 8, "svd": 5 * 8}


@dataclass(frozen=True)
class Unit:
    """One piece of work: a whole matrix pair, or one row range (piece) of it."""

    job: int
    """Index of the job (tuned checkpoint) in the plan."""
    pair: int
    """Index of the pair in its job."""
    rows: tuple[int, int] | None = None
    """The stored rows of a piece, whose sums the caller merges; None: the whole pair, metrics
    included."""

    def pair_of(self, work: Plan) -> MatrixPair:
        return work.jobs[self.job].pairs[self.pair]

    def numel(self, work: Plan) -> int:
        pair = self.pair_of(work)
        if self.rows is None:
            return pair.numel
        return (self.rows[1] - self.rows[0]) * pair.matrix_shape[1]


def splittable(job: Job, config: AnalysisConfig) -> bool:
    """Whether the job's pairs may be computed piece by piece: every enabled metric reads only the
    streamed sums, and the sums do not come from an adapter's closed form."""
    return not job.adapter and all(m.cost == "stream" for m in registry.enabled(config))


def plan_units(work: Plan, known: Collection[tuple[int, int]] = ()) -> list[Unit]:
    """Every unit of a plan, in table order (job, pair, piece), but those of the pairs
    ``(job, pair)`` in ``known`` (their values are at hand: the results cache)."""
    from .pairs import pieces

    out = []
    for j, job in enumerate(work.jobs):
        split = splittable(job, work.config)
        for p, pair in enumerate(job.pairs):
            if (j, p) in known:
                continue
            ranges = pieces(pair, work.config.block_elements) if split else []
            out += [Unit(j, p, r) for r in ranges] if len(ranges) > 1 else [Unit(j, p)]
    return out


def pair_memory(pair: MatrixPair, config: AnalysisConfig) -> int:
    """Bytes the metrics of one pair hold beyond the worker's workspace (dense matrices)."""
    enabled = registry.enabled(config)
    per_element = max((DENSE_BYTES_PER_ELEMENT.get(m.cost, 0) for m in enabled), default=0)
    return per_element * pair.numel


def unit_memory(unit: Unit, work: Plan) -> int:
    """Bytes a unit's metrics hold beyond the worker's workspace (dense matrices)."""
    return pair_memory(unit.pair_of(work), work.config)


def compute(pair: MatrixPair, rows: tuple[int, int] | None, config: AnalysisConfig,
            base: TensorSource, tuned: TensorSource, workspace: Workspace | None = None) -> Any:
    """One unit's result from what it needs alone: axis → column → value for a whole pair
    (``rows`` None); axis → sums for a piece (its stored ``rows``)."""
    from .analysis import compute_pair
    from .pairs import piece_sums

    if rows is None:
        return compute_pair(base, tuned, pair, config, workspace)
    return piece_sums(base, tuned, pair, config.axes, config.block_elements, rows, workspace)


def compute_unit(unit: Unit, work: Plan, base: TensorSource, tuned: TensorSource,
                 workspace: Workspace | None = None) -> Any:
    """A unit's result: axis → column → value for a whole pair; axis → sums for a piece."""
    return compute(unit.pair_of(work), unit.rows, work.config, base, tuned, workspace)


class Assembler:
    """Unit results in any order in, table rows in the plan's order out.

    ``known`` holds the values of pairs that are not computed (``(job, pair)`` → axis → column
    → value); ``on_pair(job, pair, values)`` is called with each computed pair's values as soon
    as its last unit is in (the results cache stores them then, so a killed run keeps them).
    """

    def __init__(self, work: Plan, units: list[Unit],
                 known: Mapping[tuple[int, int], Any] | None = None,
                 on_pair: PairCallback | None = None) -> None:
        self.work = work
        self.units = units
        self.on_pair = on_pair
        self._values: dict[tuple[int, int], Any] = dict(known or {})
        self._parts: dict[tuple[int, int], dict[Unit, Any]] = {}
        self._expected = Counter((u.job, u.pair) for u in units)

    def add(self, unit: Unit, result: Any) -> None:
        key = (unit.job, unit.pair)
        parts = self._parts.setdefault(key, {})
        parts[unit] = result
        if len(parts) == self._expected[key]:
            del self._parts[key]
            self._values[key] = self._pair_values(key, parts)
            if self.on_pair is not None:
                self.on_pair(*key, self._values[key])

    def _pair_values(self, key: tuple[int, int], parts: dict[Unit, Any]) -> Any:
        """Axis → column → value of a pair whose units are all in (pieces merged in order)."""
        from .analysis import metric_values
        from .pairs import PairView, merge_pieces

        units = sorted(parts, key=lambda u: u.rows or (0, 0))
        if units[0].rows is None:
            return parts[units[0]]
        pair = self.work.jobs[key[0]].pairs[key[1]]
        with torch_threads(1):  # as every unit: the same bits on any executor
            sums: dict[str, VectorSums] = merge_pieces(pair, [parts[u] for u in units])
            return metric_values(PairView(pair, None, None, self.work.config, sums))

    def records(self) -> list[dict]:
        """The table's rows, warnings emitted in table order (every pair must be known or have
        had all its units added)."""
        from .analysis import _row, _warn_nonfinite

        out = []
        for j, job in enumerate(self.work.jobs):
            for p, pair in enumerate(job.pairs):
                for axis, row in self._values[(j, p)].items():
                    _warn_nonfinite(job.checkpoint, pair, axis, row)
                    out.append(_row(job, pair, axis, row))
        return out


class MemoryBudget:
    """Bytes shared by the workers of one process; :meth:`hold` waits until a unit fits."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        if nbytes <= 0:
            yield
            return
        with self._cond:  # a unit larger than the whole budget waits for an empty budget
            self._cond.wait_for(lambda: self._used == 0 or self._used + nbytes <= self.total)
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


def needs_torch(config: AnalysisConfig) -> bool:
    """Whether the enabled metrics compute with torch (dense matrices, SVDs); the streaming
    pass never does."""
    return any(m.cost != "stream" for m in registry.enabled(config))


def torch_in_use(config: AnalysisConfig | None = None) -> Any:
    """The torch module where a run uses it — already imported (a reader of the plan needed it:
    adapters, pickles, DCP, ZeRO) or needed by the metrics of ``config`` — else None (and torch
    stays unloaded)."""
    torch = sys.modules.get("torch")
    if torch is None and config is not None and needs_torch(config):
        import torch
    return torch


@contextmanager
def torch_threads(n: int, config: AnalysisConfig | None = None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads (new threads inherit it), restored afterwards, where
    the run uses torch (:func:`torch_in_use`).

    One thread per worker keeps each unit's reductions in one fixed order: the same bits on any
    executor, and no oversubscription when every core already runs a worker.
    """
    torch = torch_in_use(config)
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def blas_threads(config: AnalysisConfig):
    """One NumPy/SciPy BLAS thread for the run when a metric decomposes matrices (cost ``svd``):
    the limit is set here, in the thread that starts the workers — OpenBLAS ignores one set
    later from a worker thread — and held until the last worker is done."""
    if not any(m.cost == "svd" for m in registry.enabled(config)):
        return _NO_LOCK
    from .metrics.linalg import one_blas_thread

    return one_blas_thread()


T = TypeVar("T")


def turns(base: TensorSource, tuned: TensorSource, shared: T, own: Callable[[], T]) -> T | None:
    """What a unit must hold while it reads: nothing when both sources are thread-safe;
    ``shared`` (one for the whole run) when the base is not; ``own()`` (the job's) when only the
    tuned one is not."""
    if not base.thread_safe:
        return shared
    return None if tuned.thread_safe else own()


class InOrder:
    """A turn units take one at a time **in table order** (by their positions in the plan), for
    sources that keep state between reads: remote readers' coalesced requests and read-ahead,
    DCP's chunk cache see the order of a serial run."""

    def __init__(self, positions: list[int]) -> None:
        self._waiting = deque(sorted(positions))
        self._cond = threading.Condition()
        self._aborted = False

    @contextmanager
    def hold(self, position: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._aborted or self._waiting[0] == position)
            if self._aborted:
                raise CancelledError("the run stopped")
        try:
            yield
        finally:
            with self._cond:
                self._waiting.popleft()
                self._cond.notify_all()

    def abort(self) -> None:
        """Wake every unit still waiting (the run failed: the ones before it will not come)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


def hint(job: Job, base: TensorSource, tuned: TensorSource,
         pairs: Collection[int] | None = None) -> None:
    """Remote readers fetch only the job's tensors (those of ``pairs``, by index, when given:
    the others are known), neighbours coalesced into one request."""
    chosen = job.pairs if pairs is None else [job.pairs[i] for i in sorted(pairs)]
    base.will_read([p.name for p in chosen])
    tuned.will_read([p.tuned_name for p in chosen])


class JobSources:
    """The checkpoints a local run reads: the base once, each tuned checkpoint while its units
    run (opened by the first, closed after the last), shared by the worker threads; a source that
    is not :attr:`~dora_analysis.io.base.TensorSource.thread_safe` is read by one at a time."""

    def __init__(self, work: Plan, units: list[Unit]) -> None:
        self.work = work
        self._positions: dict[int, list[int]] = {}  # job -> positions of its units
        self._pairs: dict[int, set[int]] = {}  # job -> the pairs its units compute
        for position, unit in enumerate(units):
            self._positions.setdefault(unit.job, []).append(position)
            self._pairs.setdefault(unit.job, set()).add(unit.pair)
        self._remaining = {job: len(p) for job, p in self._positions.items()}
        self._lock = threading.Lock()
        self._base: TensorSource | None = None
        self._tuned: dict[int, tuple[TensorSource, InOrder | None]] = {}
        self._shared_turn = InOrder(list(range(len(units))))
        self._own_turns: list[InOrder] = []
        self._hinted: set[int] = set()

    def acquire(self, job: int) -> tuple[TensorSource, TensorSource, InOrder | None]:
        """The sources of a job, and the turn its unit must hold while it reads them (if any)."""
        from .io.open import open_checkpoint

        options = self.work.config.read_options
        with self._lock:
            if self._base is None:
                self._base = open_checkpoint(self.work.base, options)
            if job not in self._tuned:
                path = self.work.jobs[job].checkpoint.path
                tuned = open_checkpoint(path, options, base=self._base)
                own = InOrder(self._positions[job])
                turn = turns(self._base, tuned, self._shared_turn, lambda: own)
                self._own_turns.append(own)
                self._tuned[job] = (tuned, turn)
            tuned, turn = self._tuned[job]
            return self._base, tuned, turn

    def hint_once(self, job: int, base: TensorSource, tuned: TensorSource) -> None:
        """Tell the readers what the job reads, once per job (within the unit's turn)."""
        with self._lock:
            first = job not in self._hinted
            self._hinted.add(job)
        if first:
            hint(self.work.jobs[job], base, tuned, self._pairs[job])

    def abort(self) -> None:
        """Release the units waiting for a turn: the run failed."""
        for turn in (self._shared_turn, *self._own_turns):
            turn.abort()

    def release(self, job: int) -> None:
        with self._lock:
            self._remaining[job] -= 1
            if self._remaining[job] == 0 and job in self._tuned:
                self._tuned.pop(job)[0].close()

    def close(self) -> None:
        with self._lock:
            for src, _ in self._tuned.values():
                src.close()
            self._tuned.clear()
            if self._base is not None:
                self._base.close()
                self._base = None


def resolve_workers(workers: int | None) -> int:
    """The number of worker threads: as asked, or one per usable core."""
    return workers if workers is not None else usable_cpus()


def run_local(work: Plan, workers: int | None = None, progress: Progress | None = None, *,
              known: Mapping[tuple[int, int], Any] | None = None,
              on_pair: PairCallback | None = None,
              meanwhile: Callable[[], object] | None = None) -> list[dict]:
    """Compute a plan in this process with ``workers`` threads (default: one per usable core);
    the pairs in ``known`` are not computed, ``on_pair`` gets each computed one (see
    :class:`Assembler`).

    Units are handed out in table order (the order of the tensors in the files: sequential
    reads, and remote readers' coalesced requests hold), at most two per worker ahead, so that
    few tuned checkpoints are open at once; large pairs are cut into pieces, so none is much
    longer than the rest. ``workers=1`` computes them one after the other in this thread. The
    rows are those of :func:`run_serial`, bit for bit.

    ``meanwhile()`` is called once in this thread, after the first unit is done (the kernel is
    loaded then) while the workers compute the rest: what the caller needs next (pandas, for the
    table) is imported while the cores reduce, not after.
    """
    from .io.identity import expecting
    from .pairs import Workspace

    n = resolve_workers(workers)
    units = plan_units(work, known or {})
    assembler = Assembler(work, units, known, on_pair)
    sources = JobSources(work, units)
    budget = MemoryBudget(memory_available() // 2)
    local = threading.local()

    position = {unit: i for i, unit in enumerate(units)}

    def task(unit: Unit) -> Any:
        workspace = local.__dict__.setdefault("workspace", Workspace())
        with budget.hold(unit_memory(unit, work)), expecting(work.files(unit.job)):
            base, tuned, turn = sources.acquire(unit.job)
            try:
                with turn.hold(position[unit]) if turn else _NO_LOCK:
                    sources.hint_once(unit.job, base, tuned)
                    return compute_unit(unit, work, base, tuned, workspace)
            finally:
                sources.release(unit.job)

    def done(unit: Unit, result: Any) -> None:
        assembler.add(unit, result)
        if progress is not None:
            progress(unit.numel(work))
        nonlocal meanwhile
        if meanwhile is not None:
            meanwhile, then = None, meanwhile
            then()

    try:
        with torch_threads(1, work.config), blas_threads(work.config):
            if n == 1:
                for unit in units:
                    done(unit, task(unit))
            else:
                _run_pool(task, units, n, done, abort=sources.abort)
    finally:
        sources.close()
    if meanwhile is not None:  # no unit at all
        meanwhile()
    return assembler.records()


def _run_pool(task: Callable[[Unit], Any], order: list[Unit], workers: int,
              done: Callable[[Unit, Any], None], abort: Callable[[], None]) -> None:
    """Run ``task`` over ``order`` on ``workers`` threads, at most ``2 × workers`` queued ahead
    (in order: the pool's queue is first in, first out); the first error cancels what has not
    started, wakes what waits (``abort``) and is raised here."""
    pending: dict[Future, Unit] = {}
    queue = iter(order)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="dora-analysis")
    failed = True
    try:
        while True:
            while len(pending) < 2 * workers:
                unit = next(queue, None)
                if unit is None:
                    break
                pending[pool.submit(task, unit)] = unit
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                done(pending.pop(future), future.result())
        failed = False
    finally:
        for future in pending:
            future.cancel()
        if failed:
            abort()
        pool.shutdown(wait=True)


def run_serial(work: Plan, progress: Progress | None = None) -> list[dict]:
    """Compute a plan in this thread, one unit after the other (the reference order)."""
    return run_local(work, workers=1, progress=progress)
