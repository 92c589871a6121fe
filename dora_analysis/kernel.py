"""The fused kernel of the analysis: one pass over a block of stored rows of ``w0`` and ``wt``
gives the per-vector float64 sums ``|w0|²``, ``|wt|²``, ``|wt − w0|²`` of both axes (per row and
per column) at once.

Compiled by numba (``nogil``: worker threads run it side by side; cached: compiled once per
machine, then loaded). The stored elements are widened inside the loop, so nothing is copied:

* ``bfloat16`` arrives as its 16 bits (``uint16``; numpy has no bfloat16): ``bits << 16`` is the
  float32 of the same value, widened to float64;
* ``float16`` as its bits too: the exponent is re-biased by hand (sign, subnormals, ±0, inf and
  NaN included) — numba's float16 arithmetic is incomplete and would call library helpers;
* ``float32`` and ``float64`` as themselves.

Error analysis (``u = 2⁻⁵³``; ``n`` elements per vector; ``m`` a vector's norm;
``δ = |wt − w0| / m``):

1. **Widening is exact**: every bf16, fp16 and fp32 value is a float64 value, and the bit
   conversions above produce exactly it (tested on all 65 536 patterns of each 16-bit type).
2. **The difference** ``wt − w0`` of two values with ``p``-bit significands is exact in float64
   unless their exponents differ by more than ``53 − p`` binades (45 for bf16, 42 for fp16, 29
   for fp32; nearby values are exact by Sterbenz's lemma); otherwise it is rounded once
   (relative error ≤ u). fp64 inputs: rounded once.
3. **The sums.** Each square is rounded at most once (not at all where the compiler fuses it
   with its addition: ``fma``) and each addition once. Reassociation
   (``fastmath={"reassoc", "contract"}``, nothing else) lets the compiler keep ``L`` partial
   sums of a row (vector lanes × unrolling, ``L ≤ 64``) and add them at the end, so a row sum
   errs by at most ``γ(n/L + log₂L + 1) ≈ (n/L + 7)·u`` relatively (the terms are non-negative):
   1.7e-14 for ``n = 4096``. A column sum adds its rows one after the other in row order, and the
   sums of a large matrix's row ranges (pieces) are added in row order too: at most
   ``γ(rows + 1)``, 3.6e-12 for 32 000 rows; in practice ``√rows·u``.
4. **ΔM** per vector, ``|√|wt|² − √|w0|²|``, errs by at most ``ε·m`` absolutely for a sum error
   ``ε`` (3), i.e. ``ε·m / |mt − m0|`` relatively: full fine-tuning moves ``|mt − m0|`` by
   ~``δ·m / √n``, so at ΔD ~ 1e-6 (``δ`` ≈ 1.4e-3) and ``n = 4096`` the bound is 7e-10.
5. **ΔD** per vector, ``(|wt − w0|² − (|wt| − |w0|)²) / (2|w0||wt|)``: both terms of the
   numerator are non-negative and free of the cancellation of ``1 − a·b/(|a||b|)``; it errs by at
   most ``ε·(δ²/2 + δ)`` absolutely, so relatively by ``ε·(1 + 2/δ) / τ`` for a step whose
   tangential share is ``τ`` (random steps: ``τ ≈ 1``): 2e-11 at ΔD ~ 1e-6 per row, 5e-9 per
   column of 32 000 rows — the contract asks for 1e-5. Identical inputs give ``wt − w0 = 0``
   exactly, equal ``|w0|²`` and ``|wt|²`` (the same operations on the same values), hence ΔM and
   ΔD exactly 0.0.
6. **Non-finite values propagate**: ``fastmath`` allows only reassociation and contraction, never
   ``nnan``/``ninf``, so a NaN or Inf element makes its row's and column's sums NaN or Inf in any
   order of addition, and the analysis counts that vector as non-finite. Squares cannot overflow
   from 16- or 32-bit inputs (at most 1.2e77); float64 inputs beyond 1e154 overflow to Inf and are
   counted likewise.
7. **Determinism**: the order of every addition depends only on the block's width, the axes
   asked for (each combination is its own compiled loop, whose sums may differ from another's in
   the last bits) and the machine's instruction set, never on threads or on how rows are cut
   into blocks: the kernel runs on one thread, row sums are per row, column sums run down the
   rows in order, and parallel workers take whole row ranges (pieces, fixed by the plan) whose
   sums are merged in row order. Results are the same bits on every run on one machine; another
   instruction set (AVX2 against AVX-512) may differ in the last bits, as any vectorised sum.

Why float64 sums of widened values rather than float32 arithmetic: the difference (2) would often
still be exact in float32, but float32 sums of squares err by ~1e-7 to 1e-6 relatively, while
ΔM needs the squared norms to ~1e-10 (a row scaled by 1.001 would show a direction change of
~1e-7 instead of 0). The kernel is bound by memory bandwidth either way.

The compiled code is cached in ``$NUMBA_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/dora-analysis/
numba`` (``~/.cache/...``). When that folder cannot be written, the kernel is compiled in every
process instead, and one note says so (logger ``dora_analysis``; ``dora-analyze`` prints it as
``note: …``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

log = logging.getLogger("dora_analysis")

#: How the kernel widens each stored element type (numpy has no bfloat16: its bits, as uint16).
BF16, F16, F32, F64 = 0, 1, 2, 3
#: The numpy dtypes the kernel reads, and the code it gets with each (float16 is passed as its
#: bits, like bfloat16).
KERNEL_DTYPES: dict[np.dtype, int] = {np.dtype(np.uint16): BF16, np.dtype(np.float16): F16,
                                      np.dtype(np.float32): F32, np.dtype(np.float64): F64}
#: Floating-point shortcuts allowed: reassociation (vectorised sums) and contraction (fma);
#: never ``nnan``/``ninf``, on which the detection of non-finite vectors depends.
FASTMATH = frozenset({"reassoc", "contract"})
#: Where no sum needs reassociating, only contraction: additions stay in the written order.
CONTRACT = frozenset({"contract"})


def cache_dir() -> Path:
    """Where the compiled kernel is cached: ``$NUMBA_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dora-analysis/numba`` (``~/.cache/dora-analysis/numba``)."""
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given:
        return Path(given)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dora-analysis" / "numba"


def unwritable(folder: Path) -> str | None:
    """Why nothing can be cached in ``folder`` (created if missing), or None when it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # numba's own test of a cache folder
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@contextlib.contextmanager
def _numba_cache_dir(folder: Path) -> Iterator[None]:
    """Numba's cache folder set to ``folder`` while functions are decorated (numba fixes each
    function's cache path then), restored afterwards."""
    saved = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = os.fspath(folder)
    try:
        yield
    finally:
        numba.config.CACHE_DIR = saved


def _compiled(functions: dict[str, tuple[Callable, frozenset[str]]]) -> dict[str, Callable]:
    """The kernel's functions (name → function and its ``fastmath`` flags) compiled with caching
    where the cache folder can be written, else without (and one note)."""
    folder = cache_dir()
    why = unwritable(folder)
    if why is not None:
        log.info("the kernel cache folder %s cannot be written (%s): the kernel is compiled in "
                 "every run (a few seconds); set NUMBA_CACHE_DIR to a writable folder to keep it",
                 folder, why)
    with _numba_cache_dir(folder) if why is None else contextlib.nullcontext():
        return {name: numba.njit(cache=why is None, nogil=True, fastmath=set(flags))(function)
                for name, (function, flags) in functions.items()}


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the uint32 ``bits`` (a bit cast, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


def widen(x, code):  # pragma: no cover - replaced by the overload below inside compiled code
    """One stored element as float64 (``code``: :data:`BF16` … :data:`F64`)."""
    raise NotImplementedError("widen runs only inside compiled code")


@overload(widen)  # numba inlines it (LLVM); "always" inlining of the IR warns here
def _widen(x, code):
    if isinstance(x, types.Float):
        return lambda x, code: np.float64(x)

    def from_bits(x, code):
        bits = np.uint32(x)
        if code == BF16:  # the upper half of a float32
            return np.float64(_float32_from_bits(bits << np.uint32(16)))
        # float16: sign | 5-bit exponent (bias 15) | 10-bit fraction. Moved to float32's place
        # (bias 127), a normal half becomes the float32 2^-112 times it, a subnormal one a
        # float32 subnormal 2^-112 times it: scaling by 2^112 (in float64, exact) fixes both.
        magnitude = bits & np.uint32(0x7FFF)
        finite = np.float64(_float32_from_bits(magnitude << np.uint32(13))) * 5.192296858534828e33
        special = np.inf if magnitude == np.uint32(0x7C00) else np.nan  # exponent all ones
        value = finite if magnitude < np.uint32(0x7C00) else special
        return -value if bits & np.uint32(0x8000) else value

    return from_bits


def _accumulate_rows(a, b, code_a, code_b, r0, rt, rd):
    """Row sums only (stored axis ``out``): ``r*[i]`` = the sums of row ``i``."""
    rows, cols = a.shape
    for i in range(rows):
        ar, br = a[i], b[i]
        s0 = st = sd = 0.0
        for j in range(cols):
            x, y = widen(ar[j], code_a), widen(br[j], code_b)
            d = y - x
            s0 += x * x
            st += y * y
            sd += d * d
        r0[i], rt[i], rd[i] = s0, st, sd


def _accumulate_cols(a, b, code_a, code_b, c0, ct, cd):
    """Column sums only (stored axis ``in``): ``c*[j] +=`` row after row, in row order.

    Four rows at a time: each column's total is loaded once, takes the four rows' terms one
    after the other (the order of a row-by-row pass, hence its bits) and is stored once."""
    rows, cols = a.shape
    i = 0
    while i + 4 <= rows:
        a0, a1, a2, a3, b0, b1, b2, b3 = a[i], a[i + 1], a[i + 2], a[i + 3], \
            b[i], b[i + 1], b[i + 2], b[i + 3]
        for j in range(cols):
            x0, x1 = widen(a0[j], code_a), widen(a1[j], code_a)
            x2, x3 = widen(a2[j], code_a), widen(a3[j], code_a)
            y0, y1 = widen(b0[j], code_b), widen(b1[j], code_b)
            y2, y3 = widen(b2[j], code_b), widen(b3[j], code_b)
            d0, d1, d2, d3 = y0 - x0, y1 - x1, y2 - x2, y3 - x3
            c0[j] = (((c0[j] + x0 * x0) + x1 * x1) + x2 * x2) + x3 * x3
            ct[j] = (((ct[j] + y0 * y0) + y1 * y1) + y2 * y2) + y3 * y3
            cd[j] = (((cd[j] + d0 * d0) + d1 * d1) + d2 * d2) + d3 * d3
        i += 4
    for k in range(i, rows):
        ar, br = a[k], b[k]
        for j in range(cols):
            x, y = widen(ar[j], code_a), widen(br[j], code_b)
            d = y - x
            c0[j] += x * x
            ct[j] += y * y
            cd[j] += d * d


def _accumulate_both(a, b, code_a, code_b, r0, rt, rd, c0, ct, cd):
    """Row and column sums in the same pass over the elements."""
    rows, cols = a.shape
    for i in range(rows):
        ar, br = a[i], b[i]
        s0 = st = sd = 0.0
        for j in range(cols):
            x, y = widen(ar[j], code_a), widen(br[j], code_b)
            d = y - x
            x2, y2, d2 = x * x, y * y, d * d
            s0 += x2
            st += y2
            sd += d2
            c0[j] += x2
            ct[j] += y2
            cd[j] += d2
        r0[i], rt[i], rd[i] = s0, st, sd


_KERNELS = _compiled({
    "rows": (_accumulate_rows, FASTMATH),
    "cols": (_accumulate_cols, CONTRACT),  # no reduction to vectorise: nothing to reassociate
    "both": (_accumulate_both, FASTMATH),
})


def kernel_input(w: np.ndarray) -> tuple[np.ndarray, int]:
    """A 2-D block of stored elements as the kernel reads it (C-contiguous; float16 as its bits)
    and its widening code."""
    code = KERNEL_DTYPES.get(w.dtype)
    if code is None:
        raise TypeError(f"the kernel reads uint16 (bfloat16 bits), float16, float32 or float64, "
                        f"got {w.dtype}")
    w = np.ascontiguousarray(w)
    return (w.view(np.uint16) if code == F16 else w), code


def accumulate(w0: np.ndarray, wt: np.ndarray, rows: np.ndarray | None = None,
               cols: np.ndarray | None = None) -> None:
    """Add one block of stored rows of a weight pair to its per-vector sums, in one pass.

    ``w0`` and ``wt`` are 2-D arrays of the same shape ``(r, c)`` in any of the kernel's dtypes
    (``uint16`` holds bfloat16 bits), not necessarily the same one. ``rows``, a float64
    ``(3, r)`` array, receives ``|w0|², |wt|², |wt − w0|²`` of each row; ``cols``, ``(3, c)``,
    has those of each column **added** to it (call block after block, in row order). Either may
    be None.

    Example:
        >>> rows = np.empty((3, 1)); cols = np.zeros((3, 2))
        >>> accumulate(np.array([[3.0, 4.0]]), np.array([[3.0, 0.0]]), rows, cols)
        >>> rows[:, 0].tolist(), cols[2].tolist()
        ([25.0, 9.0, 16.0], [0.0, 16.0])
    """
    if w0.shape != wt.shape or w0.ndim != 2:
        raise ValueError(f"blocks must be 2-D and of one shape, got {w0.shape} and {wt.shape}")
    (a, code_a), (b, code_b) = kernel_input(w0), kernel_input(wt)
    if rows is not None and cols is not None:
        _KERNELS["both"](a, b, code_a, code_b, *_planes(rows), *_planes(cols))
    elif rows is not None:
        _KERNELS["rows"](a, b, code_a, code_b, *_planes(rows))
    elif cols is not None:
        _KERNELS["cols"](a, b, code_a, code_b, *_planes(cols))


def _planes(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three contiguous float64 rows of a ``(3, n)`` output (one compiled signature for
    every caller, whatever the output's own layout)."""
    if sums.dtype != np.float64 or sums.shape[0] != 3 or any(
            not p.flags.c_contiguous for p in sums):
        raise ValueError("sums must be a float64 array of 3 contiguous rows")
    return sums[0], sums[1], sums[2]
