"""Planning: check everything and list the work, reading headers only.

:func:`plan` opens every checkpoint lazily (headers only), aligns names, applies the filters and
collects every problem (shape mismatches, unreadable dtypes) so they are reported together
before any number is computed; it returns a :class:`~dora_analysis.jobs.Plan` with one
:class:`~dora_analysis.jobs.Job` per tuned checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from .config import AnalysisConfig, check_method
from .errors import (
    AdapterWarning,
    CheckpointFormatError,
    ConfigError,
    TensorMismatchError,
    UnmatchedTensorsWarning,
    VanishedCheckpointError,
    listing,
)
from .io.base import TensorInfo, TensorSource
from .io.dtypes import ANALYSABLE
from .io.identity import recording
from .io.keys import (
    align_names,
    experts_stored_in_out,
    is_bias,
    is_expert_tensor,
    module_kind,
    stored_in_out,
)
from .io.open import open_checkpoint, resolve
from .io.refs import CheckpointRef, series_steps
from .jobs import Job, Plan, Ref, TunedCheckpoint, as_ref
from .pairs import MatrixPair, open_tuned
from .vanished import READ_ERRORS, check_opened


def expand_tuned(
    tuned: Sequence[Ref], labels: Sequence[str] | None = None,
    methods: Sequence[str] | None = None, token: str | None = None,
) -> list[TunedCheckpoint]:
    """Turn tuned references into checkpoints: a series folder becomes one per ``checkpoint-N``."""
    if not tuned:
        raise ConfigError("give at least one tuned checkpoint")
    labels, methods = per_ref_settings(labels, methods, len(tuned))
    refs = [as_ref(t) for t in tuned]
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
    base_path, base_shown = resolve(as_ref(base), config.token)
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
                with recording() as files, open_tuned(ck.path, options, base_src) as src:
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


def _nothing_selected(config: AnalysisConfig, ck: TunedCheckpoint, base: dict) -> str:
    if config.modules is not None or config.include is not None:
        kinds = sorted({module_kind(n) for n in base})
        return (f"no weight matrix matches the filters (--modules/--include) in {ck.ref}; "
                f"module kinds present: {', '.join(kinds)}")
    return (f"{ck.ref}: no weight matrix in common with the base (no parameter names match); "
            "is this the right base?")
