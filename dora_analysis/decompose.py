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

Error analysis (``u = 2⁻⁵³``; ``n`` elements per vector; ``m`` its norm; ``δ = |wt − w0| / m``):

1. Upcasting bf16/fp16/fp32 to float64 is exact (their values are float64 values).
2. ``wt − w0`` of two values with ``p``-bit significands is exact in float64 unless their exponents
   differ by more than ``53 − p`` binades (29 for fp32; nearby values are exact by Sterbenz's
   lemma); otherwise it is rounded once (relative error ≤ u). fp64 inputs: rounded once.
3. Each sum of ``n`` squares has relative error ``ε ≤ γₙ + 3u`` (``γₙ = nu / (1 − nu)``, any
   summation order; the norm's square root and squaring add the ``3u``): 4.5e-13 for
   ``n = 4096``, 7.3e-12 for ``n = 65536``. Vectorised reductions err like ``√n·u`` in practice.
4. ΔM per vector, ``|√|wt|² − √|w0|²|``: absolute error ≤ ``ε·m``, relative ≤ ``ε·m / |mt − m0|``.
   Full fine-tuning moves ``|mt − m0|`` by ~``δ·m / √n`` (the radial part of a random step): at
   ΔD ~ 1e-9 (``δ`` ≈ 4.5e-5) and ``n = 4096`` the bound is 6e-7 and the practical error 1e-8.
5. ΔD per vector: the numerator errs by ≤ ``ε·(|wt − w0|² + 2m·|mt − m0|)``, so ΔD errs by at most
   ``ε·(δ²/2 + δ)`` absolutely: relative error ≤ ``ε·(1 + 2/δ) / τ`` for a step whose share of
   tangential motion is ``τ`` (random steps: ``τ ≈ 1``, 2e-8 at ΔD ~ 1e-9), and an absolute error
   ≤ 1e-12 even for a purely radial step (true ΔD = 0) up to ``δ ≤ 1`` when ``n ≤ 4096``.

Why not float32, which halves the bytes: the difference (2) would often still be exact, but a
float32 sum of squares errs by ~1e-7 to 1e-6 relative, and (4) needs the squared norms to ~1e-10
for ΔM (a row scaled by 1.001 would show a direction change of ~1e-7 instead of 0). Summing
float32 values into float64 costs a float64 conversion per element anyway, i.e. the same passes
as this kernel (``benchmarks/bench_kernel.py --kernels`` times both); what makes the float64
kernel cheap is staying in cache: blocks sized from the machine's caches (see
:func:`dora_analysis.config.choose_block_elements`), one buffer of three planes, one fused
reduction over the three.

Reference: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, Eqs. 2-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .config import DEFAULT_BLOCK_ELEMENTS
from .errors import ConfigError

Axis = Literal["out", "in"]


def check_axis(axis: str) -> Axis:
    """Return ``axis`` if it is ``"out"`` or ``"in"``, else raise :class:`ConfigError`."""
    if axis not in ("out", "in"):
        raise ConfigError(f"axis must be 'out' or 'in', got {axis!r}")
    return axis  # type: ignore[return-value]


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """View a weight of shape ``(out, in, *k)`` as the 2-D ``(out, in * prod(k))`` matrix."""
    if w.dim() < 2:
        raise ConfigError(f"a weight matrix needs 2 or more dimensions, got {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def _vector_dim(axis: Axis) -> int:
    # Reducing over dim 1 gives one value per row (output channel); over dim 0, per column.
    return 1 if check_axis(axis) == "out" else 0


def magnitude(w: torch.Tensor, axis: Axis = "out") -> torch.Tensor:
    """Eq. 2: the magnitude vector ``m[n] = ||W[n]||`` in float64.

    Example:
        >>> magnitude(torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])).tolist()
        [5.0, 2.0]
    """
    return torch.linalg.vector_norm(as_matrix(w).double(), dim=_vector_dim(axis))


def direction(w: torch.Tensor, axis: Axis = "out") -> torch.Tensor:
    """Eq. 2: the direction ``V = W / ||W||`` (unit vectors along ``axis``), float64.

    A zero-norm vector has no direction; it is returned as zeros.

    Example:
        >>> direction(torch.tensor([[3.0, 4.0]])).tolist()
        [[0.6, 0.8]]
    """
    m = as_matrix(w).double()
    norms = torch.linalg.vector_norm(m, dim=_vector_dim(axis), keepdim=True)
    return torch.where(norms > 0, m / torch.where(norms > 0, norms, 1.0), 0.0)


@dataclass
class VectorSums:
    """Per-vector sums ``|w0|²``, ``|wt|²``, ``|wt − w0|²`` (float64), the state of one pass."""

    sq0: torch.Tensor
    sqt: torch.Tensor
    sqd: torch.Tensor

    @classmethod
    def zeros(cls, n_vectors: int) -> VectorSums:
        return cls(*(torch.zeros(n_vectors, dtype=torch.float64) for _ in range(3)))


class Workspace:
    """One reusable float64 buffer holding a row block three times: ``w0``, ``wt``, ``wt − w0``.

    Reusing it matters: a fresh buffer per block costs more in page faults than the arithmetic,
    and a block that stays in cache (see :func:`dora_analysis.config.choose_block_elements`) is
    several times faster than one that streams through memory. Each plane starts on a 64-byte
    boundary so that identical inputs meet identical vector loops.
    """

    def __init__(self) -> None:
        self._flat = torch.empty(0, dtype=torch.float64)
        self._bytes: dict[int, torch.Tensor] = {}

    def read_buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        """A reusable uint8 buffer of at least ``nbytes`` for the stored rows read into it (one
        slot per source, so the base's block and the tuned one's coexist)."""
        buf = self._bytes.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._bytes[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    def views(self, rows: int, cols: int) -> torch.Tensor:
        """A ``(3, rows, cols)`` float64 view (contents undefined)."""
        plane = -(-rows * cols // _ALIGN) * _ALIGN
        if self._flat.numel() < 3 * plane:
            self._flat = torch.empty(3 * plane, dtype=torch.float64)
        return self._flat.as_strided((3, rows, cols), (plane, cols, 1))


_ALIGN = 8  # float64 elements per 64 bytes (a cache line; an AVX-512 register)


def squared_norms(
    w0: torch.Tensor, wt: torch.Tensor, axes: tuple[Axis, ...] = ("out",),
    workspace: Workspace | None = None,
) -> dict[Axis, torch.Tensor]:
    """Squared norms of ``w0``, ``wt`` and ``wt − w0`` per vector along each axis: ``(3, n)``
    float64 per axis (``n`` = rows for ``out``, columns for ``in``).

    The kernel of the whole analysis (its error analysis is in the module docstring): two exact
    upcasts into one cache-resident buffer, one exact subtraction, one fused norm reduction over
    the three planes. The inputs are never modified.
    """
    a, b = as_matrix(w0), as_matrix(wt)
    if a.shape != b.shape:
        raise ConfigError(f"shapes differ: {tuple(w0.shape)} vs {tuple(wt.shape)}")
    x = (workspace or Workspace()).views(*a.shape)  # (3, rows, cols) float64
    x[0].copy_(a)  # exact: every bf16/fp16/fp32 value is a float64 value
    x[1].copy_(b)
    torch.sub(x[1], x[0], out=x[2])  # exact unless exponents differ by > 29 binades
    out: dict[Axis, torch.Tensor] = {}
    if "out" in axes:  # per row: reduce the last dimension of all three planes at once
        out["out"] = torch.linalg.vector_norm(x, dim=2).square_()  # (3, rows)
    if "in" in axes:  # per column: reduce over the rows
        out["in"] = torch.linalg.vector_norm(x, dim=1).square_()  # (3, cols)
    return out


def block_sums(
    w0: torch.Tensor, wt: torch.Tensor, axes: tuple[Axis, ...] = ("out",),
    workspace: Workspace | None = None,
) -> dict[Axis, VectorSums]:
    """Per-vector ``|w0|²``, ``|wt|²``, ``|wt − w0|²`` along each axis of one block, float64.

    Example:
        >>> s = block_sums(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]]))["out"]
        >>> s.sq0.item(), s.sqt.item(), s.sqd.item()
        (25.0, 9.0, 16.0)
    """
    return {axis: VectorSums(*norms) for axis, norms in
            squared_norms(w0, wt, axes, workspace).items()}


def magnitude_change(sums: VectorSums) -> torch.Tensor:
    """Eq. 3 summand: ``|m_t[n] − m_0[n]|`` per vector."""
    return (sums.sqt.sqrt() - sums.sq0.sqrt()).abs()


def direction_change(sums: VectorSums) -> torch.Tensor:
    """Eq. 4 summand: ``1 − cos(Wt[n], W0[n])`` per vector, numerically stable, in ``[0, 2]``.

    Uses ``(|a−b|² − (|a|−|b|)²) / (2|a||b|)``; NaN where either vector has zero norm.
    """
    m0, mt = sums.sq0.sqrt(), sums.sqt.sqrt()
    numerator = sums.sqd - (mt - m0).square()
    return (numerator / (2.0 * m0 * mt)).clamp(0.0, 2.0)


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


def summarize(sums: VectorSums) -> PairStats:
    """Reduce per-vector sums to :class:`PairStats` (Eqs. 3 and 4), excluding degenerate vectors."""
    finite = torch.isfinite(sums.sq0) & torch.isfinite(sums.sqt) & torch.isfinite(sums.sqd)
    nonzero = (sums.sq0 > 0) & (sums.sqt > 0)
    valid = finite & nonzero
    n_valid = int(valid.sum())
    if n_valid:
        dm = float(magnitude_change(sums)[valid].mean())
        dd = float(direction_change(sums)[valid].mean())
        m0 = float(sums.sq0[valid].sqrt().mean())
    else:
        dm = dd = m0 = float("nan")
    return PairStats(
        delta_m=dm,
        delta_d=dd,
        n_vectors=int(sums.sq0.numel()),
        zero_vectors=int((finite & ~nonzero).sum()),
        nonfinite_vectors=int((~finite).sum()),
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
    work because the per-vector sums are local to the block (axis ``out``) or additive over
    rows (axis ``in``). ``transposed=True`` marks a weight stored ``(in, out)`` (``Conv1D``),
    whose output channels are the stored columns.
    """

    def __init__(
        self, rows: int, cols: int, axes: tuple[Axis, ...] = ("out",), *,
        transposed: bool = False, workspace: Workspace | None = None,
    ) -> None:
        self.rows = rows
        # requested axis -> axis of the stored matrix
        self._stored = {a: stored_axis(a, transposed) for a in axes}
        # stored axis -> (3, n): |w0|², |wt|², |wt − w0|² per vector
        self._totals = {s: torch.zeros(3, rows if s == "out" else cols, dtype=torch.float64)
                        for s in set(self._stored.values())}
        self._workspace = workspace or Workspace()
        self._next_row = 0

    def add(self, w0_rows: torch.Tensor, wt_rows: torch.Tensor) -> None:
        """Add the next block of rows of both weights (any float dtype, any trailing shape)."""
        block = squared_norms(w0_rows, wt_rows, tuple(self._totals), self._workspace)
        start, stop = self._next_row, self._next_row + w0_rows.shape[0]
        for stored, total in self._totals.items():
            if stored == "out":  # one value per stored row: the block's rows are final
                total[:, start:stop] = block[stored]
            else:  # per stored column: added block after block, always in row order
                total += block[stored]
        self._next_row = stop

    def sums(self) -> dict[Axis, VectorSums]:
        """The per-vector sums per requested axis, once every row has been added."""
        if self._next_row != self.rows:
            raise RuntimeError(f"accumulated {self._next_row} of {self.rows} rows")
        return {axis: VectorSums(*self._totals[s]) for axis, s in self._stored.items()}

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
        return VectorSums(*(torch.cat(f) for f in zip(*(_fields(p) for p in parts), strict=True)))
    total = [f.clone() for f in _fields(parts[0])]
    for part in parts[1:]:
        for t, f in zip(total, _fields(part), strict=True):
            t += f
    return VectorSums(*total)


def _fields(s: VectorSums) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return s.sq0, s.sqt, s.sqd


def rows_per_block(cols: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """How many stored rows of ``cols`` elements fit one working block (at least one)."""
    return max(1, block_elements // max(1, cols))


def compare(
    w0: torch.Tensor,
    wt: torch.Tensor,
    axis: Axis = "out",
    *,
    transposed: bool = False,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> PairStats:
    """Eqs. 3 and 4 for one in-memory weight pair, in float64, in bounded-size row blocks.

    Example:
        >>> w0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
        >>> s = compare(w0, torch.tensor([[0.0, 1.0, 0.0], [0.0, 4.0, 0.0]]))
        >>> round(s.delta_d, 12), s.delta_m   # row 0 rotated 90° (1 − cos = 1); row 1 scaled by 2
        (0.5, 1.0)
    """
    if w0.shape != wt.shape:
        raise ConfigError(f"shapes differ: {tuple(w0.shape)} vs {tuple(wt.shape)}")
    a, b = as_matrix(w0), as_matrix(wt)
    acc = PairAccumulator(a.shape[0], a.shape[1], (axis,), transposed=transposed)
    step = rows_per_block(a.shape[1], block_elements)
    for start in range(0, a.shape[0], step):
        acc.add(a[start : start + step], b[start : start + step])
    return acc.result()[axis]


def delta_magnitude(w0: torch.Tensor, wt: torch.Tensor, axis: Axis = "out") -> float:
    """Eq. 3: ``ΔM = mean_n |m_t[n] − m_0[n]|`` (zero-norm and non-finite vectors excluded).

    Example:
        >>> delta_magnitude(torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]]))
        5.0
    """
    return compare(w0, wt, axis).delta_m


def delta_direction(w0: torch.Tensor, wt: torch.Tensor, axis: Axis = "out") -> float:
    """Eq. 4: ``ΔD = mean_n (1 − cos(Wt[n], W0[n]))`` (zero-norm and non-finite vectors excluded).

    Example:
        >>> round(delta_direction(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])), 12)
        1.0
    """
    return compare(w0, wt, axis).delta_d
