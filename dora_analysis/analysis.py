"""``analyze(base, tuned…)``: the tidy ΔM/ΔD table, streamed one row block at a time.

Work happens in two passes. The *plan* opens every checkpoint lazily (headers only), aligns
names, applies the filters and collects every problem (shape mismatches, unreadable dtypes)
so they are reported together before any number is computed. The *compute* pass then reads each
matrix pair in row blocks of bounded size and accumulates Eqs. 3-4 in float64.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import columns as C
from .config import AnalysisConfig, check_method
from .decompose import PairAccumulator, PairStats, Workspace, rows_per_block, summarize
from .errors import (
    CheckpointFormatError,
    ConfigError,
    NonFiniteWeightWarning,
    TensorMismatchError,
    UnmatchedTensorsWarning,
    listing,
)
from .io.base import ANALYSABLE_DTYPES, TensorInfo, TensorSource
from .io.keys import align_names, layer_index, module_kind, stored_in_out
from .io.open import open_checkpoint, resolve
from .io.refs import CheckpointRef, series_steps

Ref = str | Path | CheckpointRef
log = logging.getLogger("dora_analysis")


@dataclass(frozen=True)
class TunedCheckpoint:
    """One tuned checkpoint to compare: a single file/folder or one step of a series."""

    label: str
    method: str
    step: int | None
    path: Path
    ref: str


@dataclass(frozen=True)
class MatrixPair:
    """One weight matrix present in both checkpoints, ready to be streamed."""

    name: str
    tuned_name: str
    info: TensorInfo
    tuned_dtype: torch.dtype
    transposed: bool
    """Output channels are the stored columns (``Conv1D``, embeddings, ``fan_in_fan_out``)."""


def _as_ref(ref: Ref) -> CheckpointRef:
    return ref if isinstance(ref, CheckpointRef) else CheckpointRef.parse(str(ref))


def expand_tuned(
    tuned: Sequence[Ref], labels: Sequence[str] | None = None,
    methods: Sequence[str] | None = None, token: str | None = None,
) -> list[TunedCheckpoint]:
    """Turn tuned references into checkpoints: a series folder becomes one per ``checkpoint-N``."""
    refs = [_as_ref(t) for t in tuned]
    if not refs:
        raise ConfigError("give at least one tuned checkpoint")
    labels = _per_ref(labels, len(refs), "--label", None)
    methods = [check_method(m) for m in _per_ref(methods, len(refs), "--method", "auto")]
    out: list[TunedCheckpoint] = []
    for ref, label, method in zip(refs, labels, methods, strict=True):
        path, shown = resolve(ref, token)
        label = label or ref.default_label
        if ref.kind == "series":
            out += [TunedCheckpoint(label, method, s, p, str(p)) for s, p in series_steps(path)]
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


def _per_ref(values: Sequence[str] | None, n: int, flag: str, default: str | None) -> list:
    if values is None or len(values) == 0:
        return [default] * n
    if isinstance(values, str):
        values = [values]
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
              and info.dtype not in ANALYSABLE_DTYPES):
            raise CheckpointFormatError(
                f"{source.path}: tensor '{name}' is stored as {info.dtype} (quantized?); "
                "dequantize the checkpoint to float weights first"
            )
    return infos


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
    pairs, mismatches = [], []
    for b, t in alignment.pairs:
        if not config.selects(b, module_kind(b)):
            continue
        if base[b].shape != tuned[t].shape:
            hint = " (transposed?)" if base[b].shape == tuned[t].shape[::-1] else ""
            mismatches.append(f"{b}: {list(base[b].shape)} vs {list(tuned[t].shape)}{hint}")
            continue
        hint = transposed_hint(t)
        transposed = (stored_in_out(b) if hint is None else hint) and len(base[b].shape) == 2
        pairs.append(MatrixPair(b, t, base[b], tuned[t].dtype, transposed))
    # An adapter holds only what it changes: the rest of the base is unchanged, not missing.
    only_b = [] if partial else [n for n in alignment.base_only
                                 if config.selects(n, module_kind(n))]
    only_t = [n for n in alignment.tuned_only if config.selects(n, module_kind(n))]
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


def _blocks(
    base: TensorSource, tuned: TensorSource, pair: MatrixPair, block_elements: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rows, cols = pair.info.matrix_shape
    step = rows_per_block(cols, block_elements)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield (base.get_rows(pair.name, start, stop), tuned.get_rows(pair.tuned_name, start, stop))


def compare_pair(
    base: TensorSource, tuned: TensorSource, pair: MatrixPair, config: AnalysisConfig,
    workspace: Workspace | None = None, bar=None,
) -> dict[str, PairStats]:
    """One matrix pair's statistics per requested axis.

    Adapters give axis ``out`` in closed form (no ``B @ A``, see :mod:`dora_analysis.merge`);
    everything else streams the pair once, in row blocks, for all remaining axes.
    """
    stats: dict[str, PairStats] = {}
    axes = config.axes
    if config.closed_form and "out" in axes:
        sums = tuned.closed_form(pair.tuned_name, config.block_elements)
        if sums is not None:
            stats["out"] = summarize(sums)
            axes = tuple(a for a in axes if a != "out")
    if axes:
        rows, cols = pair.info.matrix_shape
        acc = PairAccumulator(rows, cols, axes, transposed=pair.transposed, workspace=workspace)
        for block0, block_t in _blocks(base, tuned, pair, config.block_elements):
            acc.add(block0, block_t)
        stats |= acc.result()
    if bar is not None:
        bar.update(pair.info.numel)
    return {a: stats[a] for a in config.axes}


def _row(ck: TunedCheckpoint, method: str, pair: MatrixPair, axis: str, s: PairStats) -> dict:
    rows, cols = pair.info.matrix_shape
    return {
        C.CHECKPOINT: ck.label, C.METHOD: method, C.STEP: ck.step, C.NAME: pair.name,
        C.LAYER: layer_index(pair.name), C.MODULE: module_kind(pair.name), C.ROWS: rows,
        C.COLS: cols, C.AXIS: axis, C.DELTA_M: s.delta_m, C.DELTA_D: s.delta_d,
        C.ZERO_VECTORS: s.zero_vectors, C.N_VECTORS: s.n_vectors,
        C.NONFINITE_VECTORS: s.nonfinite_vectors, C.MEAN_M0: s.mean_m0,
        C.DTYPE: str(pair.tuned_dtype).removeprefix("torch."), C.TUNED_NAME: pair.tuned_name,
        C.REF: ck.ref,
    }


def to_frame(records: list[dict]) -> pd.DataFrame:
    """Records → the analysis table with stable column order and nullable integer columns."""
    frame = pd.DataFrame.from_records(records, columns=list(C.TABLE_COLUMNS))
    for col in (C.STEP, C.LAYER):
        frame[col] = frame[col].astype("Int64")
    for col in (C.ROWS, C.COLS, C.ZERO_VECTORS, C.N_VECTORS, C.NONFINITE_VECTORS):
        frame[col] = frame[col].astype("int64")
    for col in (C.DELTA_M, C.DELTA_D, C.MEAN_M0):
        frame[col] = frame[col].astype("float64")
    return frame


def analyze(
    base: Ref,
    tuned: Ref | Sequence[Ref],
    *,
    labels: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    config: AnalysisConfig | None = None,
    **settings,
) -> pd.DataFrame:
    """Compare tuned checkpoints with their base: one row per (checkpoint, matrix, axis).

    Args:
        base: reference to the pre-trained weights (file or folder).
        tuned: one reference or several (files, folders, ``checkpoint-N`` series).
        labels: one label per tuned reference (default: derived from the reference).
        methods: ``ft``/``lora``/``dora``/``unknown``/``auto``, once or once per reference.
        config: an :class:`AnalysisConfig`; or pass its fields as keywords
            (``axis="in"``, ``modules=("q", "v")``, ``include=r"layers\\.1"``, ``progress=True``).

    Returns:
        A DataFrame with the columns of :data:`dora_analysis.columns.TABLE_COLUMNS`.

    Example:
        >>> table = analyze("pre.safetensors", "run/", modules=("q", "v"))  # doctest: +SKIP
        >>> table[["layer", "module", "delta_m", "delta_d"]]  # doctest: +SKIP
    """
    if config is None:
        config = AnalysisConfig(**settings)
    elif settings:
        raise ConfigError("pass either config= or keyword settings, not both")
    tuned_refs = [tuned] if isinstance(tuned, (str, Path, CheckpointRef)) else list(tuned)
    base_path, _ = resolve(_as_ref(base), config.token)
    checkpoints = expand_tuned(tuned_refs, labels, methods, config.token)

    options = config.read_options
    with open_checkpoint(base_path, options) as base_src:
        base_infos = matrix_infos(base_src)
        if not base_infos:
            raise CheckpointFormatError(f"{base_path}: holds no floating-point weight matrices")

        def open_tuned(ck: TunedCheckpoint) -> TensorSource:
            return open_checkpoint(ck.path, options, base=base_src)

        # Plan every checkpoint first (headers only, one open at a time) so that all problems
        # are reported together before any number is computed.
        plans, problems = [], []
        for ck in checkpoints:
            with open_tuned(ck) as src:
                pairs, mismatches = plan_pairs(base_infos, matrix_infos(src), config, ck.path,
                                               src.transposed, partial=src.partial)
                method = ck.method if ck.method != "auto" else src.method
            problems += [f"{ck.ref}: {m}" for m in mismatches]
            if not pairs and not mismatches:
                raise TensorMismatchError(_nothing_selected(config, ck, base_infos))
            plans.append((ck, method, pairs))
        if problems and not config.skip_mismatched:
            raise TensorMismatchError(
                f"{len(problems)} tensor(s) differ in shape: {listing(problems)}; is this the "
                "right base? (--skip-mismatched analyses the rest)",
                problems,
            )
        if problems:
            warnings.warn(f"skipped {len(problems)} tensor(s) of different shape: "
                          f"{listing(problems)}", UnmatchedTensorsWarning, stacklevel=2)

        total = sum(p.info.numel for _, _, pairs in plans for p in pairs)
        records, workspace = [], Workspace()
        with tqdm(total=total, unit="el", unit_scale=True, disable=not config.progress,
                  file=sys.stderr, desc="analysing", leave=False) as bar:
            for ck, method, pairs in plans:
                with open_tuned(ck) as src:
                    for pair in pairs:
                        stats = compare_pair(base_src, src, pair, config, workspace, bar)
                        for axis, s in stats.items():
                            _warn_nonfinite(ck, pair, axis, s)
                            records.append(_row(ck, method, pair, axis, s))
    return to_frame(records)


def _warn_nonfinite(ck: TunedCheckpoint, pair: MatrixPair, axis: str, s: PairStats) -> None:
    if s.nonfinite_vectors:
        warnings.warn(
            f"{ck.ref}: tensor '{pair.name}' has {s.nonfinite_vectors} of {s.n_vectors} "
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
