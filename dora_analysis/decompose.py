"""Weight decomposition into magnitude and direction, and the change of each (paper §3.2).

The axis convention lives here and only here. Weights are stored PyTorch-style,
``(out_features, in_features)`` (conv ``(out, in, *k)`` viewed as ``(out, in * prod(k))``):

* ``axis="out"`` (default): one vector per output channel = one *row* of the stored matrix. This is
  what the official DoRA code and PEFT compute; the paper writes W transposed, so its "column" is
  our row.
* ``axis="in"``: one vector per input feature = one *column* of the stored matrix.

A wrong axis is invisible on square matrices (both give N vectors of length N), so every test
here uses non-square ones.

Numerics: everything is accumulated in float64 from three per-vector sums,
``|w0|²``, ``|wt|²`` and ``|wt − w0|²``, which works block by block (bounded memory, either axis)
and gives a stable ``1 − cos``:

    1 − cos(a, b) = (|a − b|² − (|a| − |b|)²) / (2 |a| |b|)

Both numerator terms are non-negative and computed without the cancellation of ``1 − a·b/(|a||b|)``
(which in float32 keeps only ~4 digits of a ΔD near 1e-6). Identical inputs give exactly 0.0.
The sums come from one fused, compiled pass over the stored elements
(:func:`dora_analysis.kernel.accumulate`), whose error analysis is in :mod:`dora_analysis.kernel`.

Arrays: the functions take numpy arrays or torch tensors (torch is used only when given one).
``magnitude`` and ``direction`` return the kind they were given; the sums and everything after
them are numpy float64.

Reference: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, Eqs. 2-4.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .columns import Axis
from .errors import ConfigError
from .hardware import DEFAULT_BLOCK_ELEMENTS

if TYPE_CHECKING:
    import torch

    Weight = np.ndarray | torch.Tensor
else:
    Weight = Any

#: numpy dtypes the kernel reads as they are (``uint16`` = bfloat16 bits, see
#: :mod:`dora_analysis.kernel`); anything else is converted to float64 first.
_STORED = frozenset(np.dtype(t) for t in (np.uint16, np.float16, np.float32, np.float64))


def check_axis(axis: str) -> Axis:
    """Return ``axis`` if it is ``"out"`` or ``"in"``, else raise :class:`ConfigError`."""
    if axis not in ("out", "in"):
        raise ConfigError(f"axis must be 'out' or 'in', got {axis!r}")
    return axis  # type: ignore[return-value]


def _is_torch(w: object) -> bool:
    torch = sys.modules.get("torch")  # a tensor means torch is imported: never import it here
    return torch is not None and isinstance(w, torch.Tensor)


def as_matrix(w: Weight) -> Weight:
    """View a weight of shape ``(out, in, *k)`` as the 2-D ``(out, in * prod(k))`` matrix."""
    if w.ndim < 2:
        raise ConfigError(f"a weight matrix needs 2 or more dimensions, got {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def stored_array(w: Weight) -> np.ndarray:
    """A weight as the kernel reads it, without a copy where possible: numpy float16/32/64 and
    ``uint16`` (bfloat16 bits) as they are; a torch tensor as numpy (bfloat16 as its bits);
    anything else as float64."""
    if _is_torch(w):
        import torch

        t = w.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16)
        if t.dtype in (torch.float16, torch.float32, torch.float64):
            return t.contiguous().numpy()
        return t.to(torch.float64).numpy()
    w = np.asarray(w)
    return w if w.dtype in _STORED else w.astype(np.float64)


def _values(w: Weight) -> Weight:
    """A weight given to a public function: numbers, never bit patterns (a numpy ``uint16``
    array is integers here, unlike the readers' bfloat16 bits)."""
    if _is_torch(w):
        return w
    w = np.asarray(w)
    return w if w.dtype.kind == "f" else w.astype(np.float64)


def _float64(w: Weight) -> np.ndarray:
    """A weight's values as a float64 numpy matrix (public functions: ``uint16`` is a number
    here, not bfloat16 bits)."""
    if _is_torch(w):
        import torch

        return as_matrix(w.detach().cpu().to(torch.float64)).numpy()
    return as_matrix(np.asarray(w, dtype=np.float64))


def _like(values: np.ndarray, w: Weight) -> Weight:
    """``values`` as the kind of array ``w`` is (a torch tensor for a tensor)."""
    if _is_torch(w):
        import torch

        return torch.from_numpy(values)
    return values


def _vector_dim(axis: Axis) -> int:
    # Reducing over dim 1 gives one value per row (output channel); over dim 0, per column.
    return 1 if check_axis(axis) == "out" else 0


def magnitude(w: Weight, axis: Axis = "out") -> Weight:
    """Eq. 2: the magnitude vector ``m[n] = ||W[n]||`` in float64 (numpy or torch, as given).

    Example:
        >>> magnitude(np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])).tolist()
        [5.0, 2.0]
    """
    return _like(np.linalg.norm(_float64(w), axis=_vector_dim(axis)), w)


def direction(w: Weight, axis: Axis = "out") -> Weight:
    """Eq. 2: the direction ``V = W / ||W||`` (unit vectors along ``axis``), float64 (numpy or
    torch, as given). A zero-norm vector has no direction; it is returned as zeros.

    Example:
        >>> direction(np.array([[3.0, 4.0]])).tolist()
        [[0.6, 0.8]]
    """
    m = _float64(w)
    norms = np.linalg.norm(m, axis=_vector_dim(axis), keepdims=True)
    return _like(np.divide(m, norms, out=np.zeros_like(m), where=norms > 0), w)


@dataclass
class VectorSums:
    """Per-vector sums ``|w0|²``, ``|wt|²``, ``|wt − w0|²`` (float64 arrays), the state of one
    pass."""

    sq0: np.ndarray
    sqt: np.ndarray
    sqd: np.ndarray

    @classmethod
    def zeros(cls, n_vectors: int) -> VectorSums:
        return cls(*np.zeros((3, n_vectors)))

    @property
    def planes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.sq0, self.sqt, self.sqd


def magnitude_change(sums: VectorSums) -> np.ndarray:
    """Eq. 3 summand: ``|m_t[n] − m_0[n]|`` per vector."""
    return np.abs(np.sqrt(sums.sqt) - np.sqrt(sums.sq0))


def direction_change(sums: VectorSums) -> np.ndarray:
    """Eq. 4 summand: ``1 − cos(Wt[n], W0[n])`` per vector, numerically stable, in ``[0, 2]``.

    Uses ``(|a−b|² − (|a|−|b|)²) / (2|a||b|)``; NaN where either vector has zero norm.
    """
    m0, mt = np.sqrt(sums.sq0), np.sqrt(sums.sqt)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip((sums.sqd - np.square(mt - m0)) / (2.0 * m0 * mt), 0.0, 2.0)


@dataclass(frozen=True)
class PairStats:
    """The comparison of one weight pair along one axis (Eqs. 3-4 plus bookkeeping)."""

    delta_m: float
    """Eq. 3: mean |m_t − m_0| over valid vectors (NaN if none is valid)."""
    delta_d: float
    """Eq. 4: mean (1 − cos) over valid vectors (NaN if none is valid)."""
    n_vectors: int
    """All vectors along the axis."""
    zero_vectors: int
    """Vectors excluded because the base or the tuned one has zero norm (no direction)."""
    nonfinite_vectors: int
    """Vectors excluded because they contain NaN or Inf."""
    mean_m0: float
    """Mean base magnitude over valid vectors, to put ``delta_m`` in scale."""


def finite(sums: VectorSums) -> np.ndarray:
    """Vectors whose three sums are finite (no NaN or Inf among their elements)."""
    return np.isfinite(sums.sq0) & np.isfinite(sums.sqt) & np.isfinite(sums.sqd)


def summarize(sums: VectorSums) -> PairStats:
    """Reduce per-vector sums to :class:`PairStats` (Eqs. 3 and 4), excluding degenerate vectors."""
    ok = finite(sums)
    nonzero = (sums.sq0 > 0) & (sums.sqt > 0)
    valid = ok & nonzero
    n_valid = int(valid.sum())
    if n_valid:
        dm = float(magnitude_change(sums)[valid].mean())
        dd = float(direction_change(sums)[valid].mean())
        m0 = float(np.sqrt(sums.sq0[valid]).mean())
    else:
        dm = dd = m0 = float("nan")
    return PairStats(
        delta_m=dm,
        delta_d=dd,
        n_vectors=int(sums.sq0.size),
        zero_vectors=int((ok & ~nonzero).sum()),
        nonfinite_vectors=int((~ok).sum()),
        mean_m0=m0,
    )


_FLIP: dict[str, Axis] = {"out": "in", "in": "out"}


def stored_axis(axis: str, transposed: bool) -> Axis:
    """The axis of the stored matrix that holds the vectors of ``axis`` (flipped when the weight is
    stored ``(in, out)``, as ``Conv1D``)."""
    return _FLIP[axis] if transposed else check_axis(axis)


class PairAccumulator:
    """Accumulates :class:`VectorSums` over row blocks of a stored weight pair, for some axes.

    Feed consecutive blocks of rows (the stored first dimension) with :meth:`add`; both axes
    come from one pass of the kernel over each block, because the per-vector sums are local to
    the block (axis ``out``) or additive over rows, in row order (axis ``in``).
    ``transposed=True`` marks a weight stored ``(in, out)`` (``Conv1D``), whose output channels
    are the stored columns.
    """

    def __init__(self, rows: int, cols: int, axes: tuple[Axis, ...] = ("out",), *,
                 transposed: bool = False) -> None:
        self.rows = rows
        # requested axis -> axis of the stored matrix
        self._stored = {a: stored_axis(a, transposed) for a in axes}
        stored = set(self._stored.values())
        # (3, n): |w0|², |wt|², |wt − w0|² per stored row / per stored column
        self._rows = np.zeros((3, rows)) if "out" in stored else None
        self._cols = np.zeros((3, cols)) if "in" in stored else None
        self._next_row = 0

    def add(self, w0_rows: Weight, wt_rows: Weight) -> None:
        """Add the next block of rows of both weights (numpy or torch, any float dtype, any
        trailing shape; ``uint16`` numpy arrays are bfloat16 bits)."""
        from .kernel import accumulate

        a, b = as_matrix(stored_array(w0_rows)), as_matrix(stored_array(wt_rows))
        if a.shape != b.shape:
            raise ConfigError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        start, stop = self._next_row, self._next_row + a.shape[0]
        rows = None if self._rows is None else self._rows[:, start:stop]
        accumulate(a, b, rows, self._cols)
        self._next_row = stop

    def sums(self) -> dict[Axis, VectorSums]:
        """The per-vector sums per requested axis, once every row has been added."""
        if self._next_row != self.rows:
            raise RuntimeError(f"accumulated {self._next_row} of {self.rows} rows")
        totals = {"out": self._rows, "in": self._cols}
        return {axis: VectorSums(*totals[s]) for axis, s in self._stored.items()}

    def result(self) -> dict[Axis, PairStats]:
        """Eqs. 3-4 per requested axis, once every row has been added."""
        return {axis: summarize(sums) for axis, sums in self.sums().items()}


def merge_row_ranges(parts: list[VectorSums], stored: Axis) -> VectorSums:
    """The sums of a matrix from those of consecutive row ranges, in row order.

    Per-row sums (stored axis ``out``) are concatenated; per-column sums are added range after
    range, left to right, so the same ranges always give the same bits, whoever computed them.
    """
    if len(parts) == 1:
        return parts[0]
    if stored == "out":
        return VectorSums(*(np.concatenate(f) for f in zip(*(p.planes for p in parts),
                                                            strict=True)))
    total = [f.copy() for f in parts[0].planes]
    for part in parts[1:]:
        for t, f in zip(total, part.planes, strict=True):
            t += f
    return VectorSums(*total)


def rows_per_block(cols: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """How many stored rows of ``cols`` elements fit one working block (at least one)."""
    return max(1, block_elements // max(1, cols))


def compare(
    w0: Weight,
    wt: Weight,
    axis: Axis = "out",
    *,
    transposed: bool = False,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> PairStats:
    """Eqs. 3 and 4 for one in-memory weight pair (numpy or torch), in float64, in bounded-size
    row blocks.

    Example:
        >>> w0 = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
        >>> s = compare(w0, np.array([[0.0, 1.0, 0.0], [0.0, 4.0, 0.0]]))
        >>> round(s.delta_d, 12), s.delta_m   # row 0 rotated 90° (1 − cos = 1); row 1 scaled by 2
        (0.5, 1.0)
    """
    if tuple(w0.shape) != tuple(wt.shape):
        raise ConfigError(f"shapes differ: {tuple(w0.shape)} vs {tuple(wt.shape)}")
    a, b = (as_matrix(stored_array(_values(w))) for w in (w0, wt))
    acc = PairAccumulator(a.shape[0], a.shape[1], (axis,), transposed=transposed)
    step = rows_per_block(a.shape[1], block_elements)
    for start in range(0, a.shape[0], step):
        acc.add(a[start : start + step], b[start : start + step])
    return acc.result()[axis]


def delta_magnitude(w0: Weight, wt: Weight, axis: Axis = "out") -> float:
    """Eq. 3: ``ΔM = mean_n |m_t[n] − m_0[n]|`` (zero-norm and non-finite vectors excluded).

    Example:
        >>> delta_magnitude(np.array([[3.0, 4.0]]), np.array([[6.0, 8.0]]))
        5.0
    """
    return compare(w0, wt, axis).delta_m


def delta_direction(w0: Weight, wt: Weight, axis: Axis = "out") -> float:
    """Eq. 4: ``ΔD = mean_n (1 − cos(Wt[n], W0[n]))`` (zero-norm and non-finite vectors excluded).

    Example:
        >>> round(delta_direction(np.array([[1.0, 0.0]]), np.array([[0.0, 5.0]])), 12)
        1.0
    """
    return compare(w0, wt, axis).delta_d
