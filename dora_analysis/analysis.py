"""``analyze(base, tuned…)``: the tidy ΔM/ΔD table, streamed one row block at a time.

Work happens in two stages. :func:`plan` opens every checkpoint lazily (headers only), aligns
names, applies the filters and collects every problem (shape mismatches, unreadable dtypes) so
they are reported together before any number is computed; it returns one :class:`Job` per tuned
checkpoint. :func:`run_job` then reads each matrix pair of a job in row blocks of bounded size,
accumulates the per-vector sums in float64 and fills one row per axis from the metric registry
(:mod:`dora_analysis.metrics`). Jobs are plain data: an executor may run them in this process
(the default), in threads, or on other machines, each of which opens the checkpoints itself.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import columns as C
from . import metrics as registry
from .cache.results import pair_results
from .config import AnalysisConfig, check_method
from .decompose import VectorSums
from .errors import (
    AdapterWarning,
    CheckpointFormatError,
    ConfigError,
    NonFiniteWeightWarning,
    TensorMismatchError,
    UnmatchedTensorsWarning,
    VanishedCheckpointError,
    listing,
)
from .executors import hint, run_local, torch_threads
from .io.base import TensorInfo, TensorSource
from .io.dtypes import ANALYSABLE
from .io.guard import shown
from .io.identity import FileIdentity, recording
from .io.keys import (
    align_names,
    expert_index,
    experts_stored_in_out,
    is_bias,
    is_expert_tensor,
    layer_index,
    module_kind,
    stored_in_out,
)
from .io.open import open_checkpoint, resolve
from .io.refs import CheckpointRef, series_steps
from .pairs import MatrixPair, PairView, Workspace, stream_sums
from .vanished import READ_ERRORS, check_opened, without_vanished

if TYPE_CHECKING:
    import pandas as pd

Ref = str | Path | CheckpointRef


@dataclass(frozen=True)
class TunedCheckpoint:
    """One tuned checkpoint to compare: a single file/folder or one step of a series."""

    label: str
    method: str
    step: int | None
    path: Path
    ref: str


@dataclass(frozen=True)
class Job:
    """One tuned checkpoint's share of the work: the matrix pairs to compare with the base."""

    checkpoint: TunedCheckpoint
    method: str
    """The method after detection (``auto`` resolved from the checkpoint)."""
    pairs: tuple[MatrixPair, ...]
    adapter: bool = False
    """The tuned checkpoint is an adapter merged with the base as it is read (closed form)."""
    files: tuple[tuple[str, FileIdentity], ...] = ()
    """The files planning opened for this checkpoint, with their identity then (see
    :mod:`dora_analysis.io.identity`): whoever reads them later checks they did not change."""
    base: str = ""
    """The base reference as given (the table's ``base`` column); empty when there is none to
    name (an in-memory model)."""

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.pairs)


@dataclass(frozen=True)
class Plan:
    """Everything :func:`run_job` needs, checked: the base and one job per tuned checkpoint."""

    base: Path
    jobs: tuple[Job, ...]
    config: AnalysisConfig
    base_files: tuple[tuple[str, FileIdentity], ...] = ()
    """The base's files as planning found them (see :attr:`Job.files`)."""

    @property
    def numel(self) -> int:
        return sum(job.numel for job in self.jobs)

    def files(self, job: int) -> dict[str, FileIdentity]:
        """Path → planned identity of every file a unit of ``job`` may open."""
        return dict(self.base_files) | dict(self.jobs[job].files)


def _as_ref(ref: Ref) -> CheckpointRef:
    return ref if isinstance(ref, CheckpointRef) else CheckpointRef.parse(str(ref))


def expand_tuned(
    tuned: Sequence[Ref], labels: Sequence[str] | None = None,
    methods: Sequence[str] | None = None, token: str | None = None,
) -> list[TunedCheckpoint]:
    """Turn tuned references into checkpoints: a series folder becomes one per ``checkpoint-N``."""
    if not tuned:
        raise ConfigError("give at least one tuned checkpoint")
    labels, methods = per_ref_settings(labels, methods, len(tuned))
    refs = [_as_ref(t) for t in tuned]
    out: list[TunedCheckpoint] = []
    for ref, label, method in zip(refs, labels, methods, strict=True):
        path, shown = resolve(ref, token)
        label = label or ref.default_label
        steps = remote_steps(path, token) if ref.kind == "remote" else []
        if ref.kind == "series":
            out += [TunedCheckpoint(label, method, s, p, str(p)) for s, p in series_steps(path)]
        elif steps:  # a remote run folder: one checkpoint per checkpoint-N/ or step-N/
            out += [TunedCheckpoint(label, method, s, u, f"{shown.rstrip('/')}/{u.name}")
                    for s, u in steps]
        else:
            out.append(TunedCheckpoint(label, method, ref.step, path, shown))
    seen: dict[tuple[str, int | None], str] = {}
    for ck in out:
        key = (ck.label, ck.step)
        if key in seen:
            raise ConfigError(
                f"'{seen[key]}' and '{ck.ref}' would both be labelled '{ck.label}'"
                + (f" at step {ck.step}" if ck.step is not None else "")
                + "; give each a distinct --label"
            )
        seen[key] = ck.ref
    return out


def remote_steps(url, token: str | None) -> list:
    """The steps of a remote run folder (``checkpoint-N/``, ``step-N/``), listed through fsspec."""
    from .io.remote import series_steps as remote_series_steps  # fsspec only when needed

    return remote_series_steps(url, token)


def per_ref_settings(labels: Sequence[str] | None, methods: Sequence[str] | None, n: int
                     ) -> tuple[list[str | None], list[str]]:
    """``--label`` and ``--method`` checked and spread to one per tuned reference."""
    return (per_reference(labels, n, "--label", None),
            [check_method(m) for m in per_reference(methods, n, "--method", "auto")])


def per_reference(values: Sequence[str] | None, n: int, flag: str, default: str | None) -> list:
    """One value per tuned reference, as ``--label`` and ``--method`` take them: none (each gets
    ``default``), a string or one value (for all) or exactly one per reference; anything else is
    a ConfigError.

    Example:
        >>> per_reference(["FT"], 2, "--label", None)
        ['FT', 'FT']
    """
    if isinstance(values, str):  # one label or method, never read letter by letter
        values = [values]
    if values is None:
        return [default] * n
    if isinstance(values, bytes | Mapping) or not isinstance(values, Iterable):
        raise ConfigError(f"{flag} takes a string or a list of strings, got {values!r}")
    values = list(values)
    if not values:
        return [default] * n
    if not all(v is None or isinstance(v, str) for v in values):  # None: the default
        raise ConfigError(f"{flag} takes a string or a list of strings, got {values!r}")
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise ConfigError(f"{flag} was given {len(values)} times for {n} tuned checkpoints; "
                          f"give it once (for all) or once per checkpoint")
    return list(values)


def matrix_infos(source: TensorSource) -> dict[str, TensorInfo]:
    """Infos of every weight that Eqs. 2-4 apply to; refuses quantized weights by name."""
    infos = {}
    for name, info in source.infos().items():
        if info.is_matrix:
            infos[name] = info
        elif (name.endswith(".weight") and len(info.shape) >= 2
              and info.dtype not in ANALYSABLE):
            raise CheckpointFormatError(
                f"{source.path}: tensor '{name}' is stored as {info.dtype} (quantized?); "
                "dequantize the checkpoint to float weights first"
            )
    return infos


def _units(name: str, tuned_name: str, info: TensorInfo, tuned_dtype, transposed: bool
           ) -> list[MatrixPair]:
    """The matrices one stored weight holds: itself, or one per expert of a 3-D MoE tensor."""
    if is_expert_tensor(name, info.shape):
        return [MatrixPair(name, tuned_name, info, tuned_dtype, transposed, expert=e)
                for e in range(info.shape[0])]
    return [MatrixPair(name, tuned_name, info, tuned_dtype, transposed)]


def plan_pairs(
    base: dict[str, TensorInfo],
    tuned: dict[str, TensorInfo],
    config: AnalysisConfig,
    tuned_path: Path,
    transposed_hint: Callable[[str], bool | None] = lambda name: None,
    partial: bool = False,
) -> tuple[list[MatrixPair], list[str]]:
    """Aligned, filtered matrix pairs, and the shape mismatches (``name: base vs tuned``)."""
    alignment = align_names(list(base), list(tuned))
    shapes = {n: i.shape for n, i in base.items()}
    pairs, mismatches = [], []
    for b, t in alignment.pairs:
        if is_bias(b) or not config.selects(b):
            continue
        if base[b].shape != tuned[t].shape:
            hint = " (transposed?)" if base[b].shape == tuned[t].shape[::-1] else ""
            mismatches.append(f"{b}: {list(base[b].shape)} vs {list(tuned[t].shape)}{hint}")
            continue
        hint = transposed_hint(t)
        if is_expert_tensor(b, base[b].shape):
            transposed = experts_stored_in_out(b, shapes) if hint is None else hint
        else:
            transposed = (stored_in_out(b) if hint is None else hint) and len(base[b].shape) == 2
        pairs += _units(b, t, base[b], tuned[t].dtype, transposed)
    # An adapter holds only what it changes: the rest of the base is unchanged, not missing.
    # An alias (a base's tied lm_head) that the tuned checkpoint does not save is the tensor
    # it shares, not a missing one.
    only_b = [] if partial else [n for n in alignment.base_only if base[n].alias_of is None
                                 and not is_bias(n) and config.selects(n)]
    only_t = [n for n in alignment.tuned_only
              if not is_bias(n) and config.selects(n)]
    if (only_b or only_t) and pairs:
        parts = []
        if only_b:
            parts.append(f"{len(only_b)} only in the base ({listing(only_b)})")
        if only_t:
            parts.append(f"{len(only_t)} only in {tuned_path} ({listing(only_t)})")
        warnings.warn(
            "weight matrices skipped, " + "; ".join(parts), UnmatchedTensorsWarning, stacklevel=3
        )
    return pairs, mismatches


def pair_sums(base: TensorSource, tuned: TensorSource, pair: MatrixPair, config: AnalysisConfig,
              workspace: Workspace | None = None) -> dict:
    """The per-vector sums of one pair along every requested axis.

    Adapters give axis ``out`` in closed form (no ``B @ A``, see :mod:`dora_analysis.io.merge`);
    everything else streams the pair once, in row blocks, for all remaining axes.
    """
    sums, axes = {}, config.axes
    if config.closed_form and "out" in axes and pair.expert is None:
        closed = tuned.closed_form(pair.tuned_name, config.block_elements)
        if closed is not None:
            sums["out"] = VectorSums(*closed)
            axes = tuple(a for a in axes if a != "out")
    if axes:
        sums |= stream_sums(base, tuned, pair, axes, config.block_elements, workspace)
    return sums


def compute_pair(base: TensorSource, tuned: TensorSource, pair: MatrixPair,
                 config: AnalysisConfig, workspace: Workspace | None = None
                 ) -> dict[str, dict[str, object]]:
    """Every enabled metric of one matrix pair: axis → column → value."""
    return metric_values(
        PairView(pair, base, tuned, config, pair_sums(base, tuned, pair, config, workspace)))


def metric_values(view: PairView) -> dict[str, dict[str, object]]:
    """Every enabled metric of one pair's view: axis → column → value."""
    config = view.config
    metrics = registry.enabled(config)
    per_matrix: dict[str, object] = {}
    for metric in metrics:
        if not metric.per_axis:
            per_matrix |= metric.compute(view)
    values = {}
    for axis in config.axes:
        at = view.at(axis)
        row: dict[str, object] = {}
        for metric in metrics:
            row |= metric.compute(at) if metric.per_axis else {}
        values[axis] = row | per_matrix
    return values


def _row(job: Job, pair: MatrixPair, axis: str, values: dict[str, object]) -> dict:
    ck = job.checkpoint
    rows, cols = pair.matrix_shape
    return {
        C.CHECKPOINT: shown(ck.label), C.METHOD: job.method, C.STEP: ck.step, C.NAME: pair.name,
        C.LAYER: layer_index(pair.name), C.MODULE: module_kind(pair.name), C.ROWS: rows,
        C.COLS: cols, C.AXIS: axis, C.EXPERT: pair.expert if pair.expert is not None
        else expert_index(pair.name),
        C.DTYPE: pair.tuned_dtype, C.TUNED_NAME: pair.tuned_name,
        # names that are not UTF-8, escaped: a table holds text
        C.REF: shown(ck.ref), C.BASE: shown(job.base), **values,
    }


def run_job(job: Job, base: TensorSource, tuned: TensorSource, config: AnalysisConfig, *,
            workspace: Workspace | None = None, progress: Callable[[int], object] | None = None
            ) -> list[dict]:
    """The table rows of one job, in pair then axis order, from already opened sources.

    ``progress(n)`` is called with the number of elements of each pair when it is done. Torch
    runs one thread meanwhile, as every executor does: the same bits as :func:`analyze`.
    """
    hint(job, base, tuned)  # remote readers fetch only these tensors, neighbours coalesced
    records = []
    with torch_threads(1, config):
        for pair in job.pairs:
            for axis, values in compute_pair(base, tuned, pair, config, workspace).items():
                _warn_nonfinite(job.checkpoint, pair, axis, values)
                records.append(_row(job, pair, axis, values))
            if progress is not None:
                progress(pair.numel)
    return records


def table_columns(config: AnalysisConfig | None = None) -> list[str]:
    """Column order of the table: the contract's columns, then every enabled metric's."""
    extra = [c.name for c in registry.metric_columns(config) if c.name not in C.TABLE_COLUMNS]
    return [*C.TABLE_COLUMNS, *extra]


def to_frame(records: list[dict], config: AnalysisConfig | None = None) -> pd.DataFrame:
    """Records → the analysis table with stable column order and typed columns."""
    import pandas as pd

    frame = pd.DataFrame.from_records(records, columns=table_columns(config))
    dtypes = C.TABLE_DTYPES | {c.name: c.dtype for c in registry.metric_columns(config)}
    return frame.astype({k: v for k, v in dtypes.items() if k in frame.columns})


def plan(base: Ref, tuned: Ref | Sequence[Ref], *, labels: Sequence[str] | None = None,
         methods: Sequence[str] | None = None, config: AnalysisConfig | None = None) -> Plan:
    """Check everything and list the work, reading headers only; every problem reported at once.

    Example:
        >>> work = plan("base/", ["run/"], config=AnalysisConfig())  # doctest: +SKIP
        >>> len(work.jobs), work.numel  # doctest: +SKIP
    """
    config = config or AnalysisConfig()
    tuned_refs = [tuned] if isinstance(tuned, (str, Path, CheckpointRef)) else list(tuned)
    per_ref_settings(labels, methods, max(1, len(tuned_refs)))  # before any file is looked at
    base_path, base_shown = resolve(_as_ref(base), config.token)
    checkpoints = expand_tuned(tuned_refs, labels, methods, config.token)
    options = config.read_options
    jobs, problems = [], []
    with recording() as base_files, open_checkpoint(base_path, options) as base_src:
        base_infos = matrix_infos(base_src)
        if not base_infos:
            raise CheckpointFormatError(f"{base_path}: holds no floating-point weight matrices")
        check_modules(config, base_infos, base_shown)
        # One tuned checkpoint open at a time: a long adapter series stays small.
        for ck in checkpoints:
            try:
                with recording() as files, \
                        open_checkpoint(ck.path, options, base=base_src) as src:
                    for note in src.notes:  # once per run: the run's own openings stay quiet
                        warnings.warn(note, AdapterWarning, stacklevel=2)
                    pairs, mismatches = plan_pairs(base_infos, matrix_infos(src), config,
                                                   ck.path, src.transposed, partial=src.partial)
                    method = ck.method if ck.method != "auto" else src.method
                    adapter = src.partial
            except READ_ERRORS as exc:  # rotated away since it was listed? (--skip-vanished)
                check_opened(ck, exc, config.skip_vanished)
                continue
            problems += [f"{ck.ref}: {m}" for m in mismatches]
            if not pairs and not mismatches:
                raise TensorMismatchError(_nothing_selected(config, ck, base_infos))
            jobs.append(Job(ck, method, tuple(pairs), adapter, tuple(files.items()),
                            base_shown))
    if checkpoints and not jobs:
        raise VanishedCheckpointError("every tuned checkpoint vanished while being read; "
                                      "nothing is left to analyse")
    if problems and not config.skip_mismatched:
        raise TensorMismatchError(
            f"{len(problems)} tensor(s) differ in shape: {listing(problems)}; is this the "
            "right base? (--skip-mismatched analyses the rest)",
            problems,
        )
    if problems:
        warnings.warn(f"skipped {len(problems)} tensor(s) of different shape: "
                      f"{listing(problems)}", UnmatchedTensorsWarning, stacklevel=2)
    check_modules_planned(config, [p.name for job in jobs for p in job.pairs])
    return Plan(base_path, tuple(jobs), config, tuple(base_files.items()))


def check_modules(config: AnalysisConfig, base_names: Iterable[str], base: str) -> None:
    """Every ``--modules`` entry names a module kind or a module of the base, else a
    :class:`ConfigError` naming the entries that match nothing and the kinds there are."""
    names = [n for n in base_names if not is_bias(n)]
    missing = config.unmatched_modules(names)
    if missing:
        kinds = sorted({module_kind(n) for n in names})
        raise ConfigError(
            f"--modules {', '.join(missing)}: no module of {base} has that kind or name; "
            f"module kinds present: {', '.join(kinds)} (a module's own name, such as q_proj, "
            "works too)")


def check_modules_planned(config: AnalysisConfig, planned: Sequence[str]) -> None:
    """Say which ``--modules`` entries, though modules of the base, select no matrix that will be
    analysed: no tuned checkpoint changes one (an adapter of other modules), or ``--include``
    leaves them out. A warning, not an error: those matrices are unchanged, not missing."""
    unused = config.unmatched_modules(planned)
    if unused:
        include = ", or --include leaves them out" if config.include is not None else ""
        kinds = sorted({module_kind(n) for n in planned})
        warnings.warn(
            f"--modules {', '.join(unused)}: no rows; no tuned checkpoint holds such a matrix "
            f"(an adapter holds only the modules it trains{include}); kinds analysed: "
            f"{', '.join(kinds)}", UnmatchedTensorsWarning, stacklevel=3)


def run(work: Plan, client: Any = None, cache: Any = None, *,
        meanwhile: Callable[[], object] | None = None) -> list[dict]:
    """Compute a plan: on a Dask cluster when ``client`` is given, else in this process on
    ``config.workers`` threads (default: every usable core). The rows are the same, bit for bit,
    in the same order, whichever runs them (see :mod:`dora_analysis.executors`).

    ``cache`` (see :func:`analyze`): pairs computed by an earlier run are read from it and each
    pair computed is stored as soon as it is done. A tuned checkpoint deleted meanwhile stops
    the run, or is left out (``skip_vanished``; see :mod:`dora_analysis.vanished`).

    ``meanwhile()`` runs in this thread while the workers compute (imports the caller needs
    next; see :func:`~dora_analysis.executors.run_local`).
    """
    from tqdm.auto import tqdm

    config = work.config
    with tqdm(total=work.numel, unit="el", unit_scale=True, disable=not config.progress,
              file=sys.stderr, desc="analysing", leave=False) as bar, \
            pair_results(work, cache) as results:
        while True:
            known = results.known(work)
            bar.reset(total=work.numel)
            bar.update(sum(work.jobs[j].pairs[p].numel for j, p in known))
            hooks = {"progress": bar.update, "known": known, "on_pair": results.recorder(work)}
            try:
                if client is not None:
                    from .integrations.dask import run_dask

                    if meanwhile is not None:
                        meanwhile()
                    records = run_dask(work, client, **hooks)
                else:
                    records = run_local(work, config.workers, meanwhile=meanwhile, **hooks)
            except READ_ERRORS as exc:
                work = without_vanished(work, exc)  # re-raises unless a checkpoint vanished
                continue
            results.report(sum(len(job.pairs) for job in work.jobs))
            return records


def import_modules(*names: str) -> Callable[[], None]:
    """A ``meanwhile`` for :func:`run`: import these modules (the table needs pandas)."""
    def load() -> None:
        for name in names:
            importlib.import_module(name)

    return load


def analyze(
    base: Ref,
    tuned: Ref | Sequence[Ref],
    *,
    labels: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    config: AnalysisConfig | None = None,
    client: Any = None,
    cache: bool | str | Path | None = None,
    **settings,
) -> pd.DataFrame:
    """Compare tuned checkpoints with their base: one row per (checkpoint, matrix, axis).

    Args:
        base: reference to the pre-trained weights (file or folder).
        tuned: one reference or several (files, folders, ``checkpoint-N`` series).
        labels: one label per tuned reference (default: derived from the reference).
        methods: ``ft``/``lora``/``dora``/``unknown``/``auto``, once or once per reference.
        config: an :class:`AnalysisConfig`; or pass its fields as keywords
            (``axis="in"``, ``modules=("q", "v")``, ``include=r"layers\\.1"``, ``progress=True``),
            metric switches and settings alike (see :mod:`dora_analysis.metrics`);
            ``workers=N`` threads (default: every usable core).
        client: a ``dask.distributed.Client``: run on its cluster instead (the workers open the
            checkpoints themselves, by the same paths); the table is the same, bit for bit.
        cache: the results cache (:mod:`dora_analysis.cache.results`): ``True`` for the
            default folder (``$XDG_CACHE_HOME/dora-analysis``, as ``dora-analyze``), a folder,
            or None (the default: nothing written). A run stopped midway and started again
            computes only what it had not; the table is the same, bit for bit.

    Returns:
        A DataFrame with the columns of :data:`dora_analysis.columns.TABLE_COLUMNS` followed by
        those of the enabled metrics.

    Example:
        >>> table = analyze("pre.safetensors", "run/", modules=("q", "v"))  # doctest: +SKIP
        >>> table[["layer", "module", "delta_m", "delta_d"]]  # doctest: +SKIP
    """
    if config is None:
        config = AnalysisConfig.from_settings(**settings)
    elif settings:
        raise ConfigError("pass either config= or keyword settings, not both")
    work = plan(base, tuned, labels=labels, methods=methods, config=config)
    return to_frame(run(work, client, cache, meanwhile=import_modules("pandas")), config)


def _warn_nonfinite(ck: TunedCheckpoint, pair: MatrixPair, axis: str, values: dict) -> None:
    bad = values.get(C.NONFINITE_VECTORS)
    if bad:
        where = f" (expert {pair.expert})" if pair.expert is not None else ""
        warnings.warn(
            f"{ck.ref}: tensor '{pair.name}'{where} has {bad} of {values[C.N_VECTORS]} "
            f"vectors (axis {axis}) with NaN or Inf; they are excluded from delta_m/delta_d",
            NonFiniteWeightWarning,
            stacklevel=3,
        )


def _nothing_selected(config: AnalysisConfig, ck: TunedCheckpoint, base: dict) -> str:
    if config.modules is not None or config.include is not None:
        kinds = sorted({module_kind(n) for n in base})
        return (f"no weight matrix matches the filters (--modules/--include) in {ck.ref}; "
                f"module kinds present: {', '.join(kinds)}")
    return (f"{ck.ref}: no weight matrix in common with the base (no parameter names match); "
            "is this the right base?")
