"""One weight matrix compared between two checkpoints, and lazy access to its data for metrics.

A :class:`MatrixPair` names what is compared (a 2-D view of a stored weight; one expert of a
3-D MoE expert tensor). A :class:`PairView` is what a metric sees: the per-vector sums of the one
streaming pass (always computed, for every requested axis, reading each tensor once), and, only
when a metric asks, the dense float64 weights, ΔW, or the adapter's low-rank factors — loaded
once per pair and dropped with the view.

Orientation: dense matrices handed to metrics always have **output channels as rows**, whatever
the storage (``Conv1D``, embeddings and ``fan_in_fan_out`` adapters store them as columns).

Reading: rows that a reader maps into memory (:meth:`~dora_analysis.io.base.TensorSource.mapped`)
are handed to the kernel a whole piece at once, without a copy; others are read block by block
into the worker's two reused buffers (:class:`Workspace`). The dense matrices are torch tensors,
for the metrics that need them (torch is imported then, not before).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .decompose import (
    PairAccumulator,
    PairStats,
    VectorSums,
    merge_row_ranges,
    rows_per_block,
    stored_axis,
    summarize,
)
from .io.base import TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

    from .config import AnalysisConfig
    from .io.adapters import LowRankUpdate


@dataclass(frozen=True)
class MatrixPair:
    """One weight matrix present in both checkpoints, ready to be streamed."""

    name: str
    tuned_name: str
    info: TensorInfo
    tuned_dtype: str
    """The tuned tensor's stored dtype, by name (``bfloat16``)."""
    transposed: bool
    """Output channels are the stored columns (``Conv1D``, embeddings, ``fan_in_fan_out``)."""
    expert: int | None = None
    """For a 3-D MoE expert tensor ``(E, out, in)``: which expert; its matrix is ``W[expert]``."""

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the stored 2-D matrix this pair compares."""
        if self.expert is not None:
            return self.info.shape[1], self.info.shape[2]
        return self.info.matrix_shape

    @property
    def numel(self) -> int:
        rows, cols = self.matrix_shape
        return rows * cols


def read_rows(source: TensorSource, name: str, pair: MatrixPair, start: int, stop: int
              ) -> torch.Tensor:
    """Stored rows ``start:stop`` of the pair's 2-D matrix from one source, as a torch tensor of
    the stored dtype (for the dense metrics)."""
    if pair.expert is not None:
        return source.get_expert_rows(name, pair.expert, start, stop)
    return source.get_rows(name, start, stop)


class Workspace:
    """A worker's two reusable read buffers, one per checkpoint of a pair (grown on demand).

    Reusing them matters: a fresh buffer per block costs more in page faults than the
    arithmetic, and a block read into a buffer that stays in cache is reduced from the cache.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, np.ndarray] = {}

    def read_buffer(self, slot: int, nbytes: int) -> np.ndarray:
        """A reusable uint8 buffer of at least ``nbytes`` for the stored rows read into it (one
        slot per source, so the base's block and the tuned one's coexist)."""
        buf = self._buffers.get(slot)
        if buf is None or buf.size < nbytes:
            buf = self._buffers[slot] = np.empty(nbytes, dtype=np.uint8)
        return buf


#: Blocks per piece: a pair larger than one piece is streamed (and may be distributed) as
#: consecutive row ranges of this many blocks, whose sums are merged in row order. 128 blocks
#: of 2^18 elements: a LLaMA-7B embedding is 4 pieces, no unit of work much longer than a layer.
PIECE_BLOCKS = 128


def pieces(pair: MatrixPair, block_elements: int) -> list[tuple[int, int]]:
    """The stored row ranges ``(start, stop)`` a pair is streamed in, each of whole blocks.

    They depend only on the pair's shape and the block size, never on who runs them, so a pair
    computed piece by piece on several workers gives the bits of a serial run.
    """
    rows, cols = pair.matrix_shape
    step = rows_per_block(cols, block_elements) * PIECE_BLOCKS
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def row_blocks(base: TensorSource, tuned: TensorSource, pair: MatrixPair, block_elements: int,
               start: int = 0, stop: int | None = None, workspace: Workspace | None = None,
               ) -> Iterator[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]]:
    """Consecutive stored row blocks of both matrices (rows ``start:stop``): the whole range at
    once when both readers map it into memory, else blocks of at most ``block_elements`` read
    into the workspace's reused buffers (each valid until the next one is read)."""
    rows, cols = pair.matrix_shape
    stop = rows if stop is None else stop
    mapped = base.mapped(pair.name) and tuned.mapped(pair.tuned_name)
    step = max(1, stop - start) if mapped else rows_per_block(cols, block_elements)
    buffers: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
    if not mapped:
        workspace = workspace or Workspace()
        nbytes = min(step, stop - start) * cols * 8  # enough for any stored float dtype
        buffers = workspace.read_buffer(0, nbytes), workspace.read_buffer(1, nbytes)
    for first in range(start, stop, step):
        last = min(stop, first + step)
        yield (base.read_rows(pair.name, first, last, expert=pair.expert, buffer=buffers[0]),
               tuned.read_rows(pair.tuned_name, first, last, expert=pair.expert,
                               buffer=buffers[1]))


def piece_sums(base: TensorSource, tuned: TensorSource, pair: MatrixPair,
               axes: tuple[str, ...], block_elements: int, rows: tuple[int, int],
               workspace: Workspace | None = None) -> dict[str, VectorSums]:
    """Per-vector sums for ``axes`` over the stored rows ``rows`` of one pair (one piece)."""
    start, stop = rows
    acc = PairAccumulator(stop - start, pair.matrix_shape[1], axes, transposed=pair.transposed)
    for block0, block_t in row_blocks(base, tuned, pair, block_elements, start, stop, workspace):
        acc.add(block0, block_t)
    return acc.sums()


def merge_pieces(pair: MatrixPair, parts: list[dict[str, VectorSums]]) -> dict[str, VectorSums]:
    """The sums of a whole pair from those of its :func:`pieces`, in row order."""
    return {axis: merge_row_ranges([p[axis] for p in parts], stored_axis(axis, pair.transposed))
            for axis in parts[0]}


def stream_sums(base: TensorSource, tuned: TensorSource, pair: MatrixPair,
                axes: tuple[str, ...], block_elements: int,
                workspace: Workspace | None = None) -> dict[str, VectorSums]:
    """Per-vector sums for ``axes`` from one streaming pass over both matrices (float64)."""
    return merge_pieces(pair, [piece_sums(base, tuned, pair, axes, block_elements, rows,
                                          workspace) for rows in pieces(pair, block_elements)])


@dataclass
class PairView:
    """What a metric sees of one matrix pair: sums per axis, and dense data on request."""

    pair: MatrixPair
    base: TensorSource
    tuned: TensorSource
    config: AnalysisConfig
    sums_by_axis: dict[str, VectorSums]
    axis: str = "out"
    """The axis of the row being filled (per-axis metrics read ``sums()`` of this axis)."""
    _dense: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def at(self, axis: str) -> PairView:
        """The same view for another axis, sharing what was already loaded."""
        return PairView(self.pair, self.base, self.tuned, self.config, self.sums_by_axis, axis,
                        self._dense)

    def sums(self) -> VectorSums:
        """Per-vector ``|w0|², |wt|², |wt − w0|²`` along this view's axis (float64)."""
        return self.sums_by_axis[self.axis]

    def stats(self) -> PairStats:
        """Eqs. 3-4 along this view's axis."""
        return summarize(self.sums())

    def _dense_matrix(self, key: str, source: TensorSource, name: str) -> torch.Tensor:
        if key not in self._dense:
            import torch

            rows, _ = self.pair.matrix_shape
            w = read_rows(source, name, self.pair, 0, rows).reshape(rows, -1).to(torch.float64)
            self._dense[key] = w.T if self.pair.transposed else w  # (out, in)
        return self._dense[key]

    def base_weight(self) -> torch.Tensor:
        """W0 dense in float64, output channels as rows (read on first call; the tuned weight
        is not read, so an adapter is not merged)."""
        return self._dense_matrix("w0", self.base, self.pair.name)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W0, Wt)`` dense in float64, output channels as rows (read on first call)."""
        return self.base_weight(), self._dense_matrix("wt", self.tuned, self.pair.tuned_name)

    def delta(self) -> torch.Tensor:
        """ΔW = Wt − W0, dense float64, output channels as rows."""
        if "delta" not in self._dense:
            w0, wt = self.weights()
            self._dense["delta"] = wt - w0
        return self._dense["delta"]

    def low_rank(self) -> LowRankUpdate | None:
        """ΔW = s·B·A exactly (a LoRA adapter's module), else None."""
        return self.tuned.low_rank(self.pair.tuned_name) if self.pair.expert is None else None

    def adapter_update(self) -> LowRankUpdate | None:
        """The adapter's stored update of this matrix (LoRA or DoRA), else None (also for a
        view of merged pieces, which has no sources: adapters are never split)."""
        if self.pair.expert is not None or self.tuned is None:
            return None
        return self.tuned.adapter_update(self.pair.tuned_name)
