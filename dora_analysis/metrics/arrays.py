"""Arrays as the metrics take them: numpy or torch in, float64 numpy inside, and values as stored.

The tensor-level metrics (:mod:`dora_analysis.metrics`) accept numpy arrays or torch tensors of
any float dtype, bfloat16 included (numpy has none: its values are read from the bit pattern),
and compute in float64 — an exact upcast of every stored float. Torch is imported only when a
torch tensor is given.

The measures that depend on storage (update sparsity, changed-element masks) also need the
stored dtype: :class:`Stored` keeps an array's bit patterns with its dtype's name. Its
:func:`ulp` is ``np.spacing``'s meaning in that dtype — the gap from ``|x|`` to the next larger
magnitude the dtype holds — and :func:`rounded` rounds float64 values once, to nearest with ties
to even, into a stored dtype (bfloat16 included; torch's own float64 → bfloat16 conversion rounds
twice, through float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point storage format (IEEE-754 style, with subnormals)."""

    mantissa_bits: int
    """Stored fraction bits (the significand has one more)."""
    min_exponent: int
    """Exponent of the smallest normal number: 2^min_exponent."""
    max_finite: float
    bits: type
    """Unsigned numpy integer type of the bit pattern."""

    @property
    def smallest_subnormal(self) -> float:
        return float(np.ldexp(1.0, self.min_exponent - self.mantissa_bits))


#: The float dtypes checkpoints store, by torch's / numpy's name.
FORMATS: dict[str, FloatFormat] = {
    "float64": FloatFormat(52, -1022, float(np.finfo(np.float64).max), np.uint64),
    "float32": FloatFormat(23, -126, float(np.finfo(np.float32).max), np.uint32),
    "float16": FloatFormat(10, -14, 65504.0, np.uint16),
    "bfloat16": FloatFormat(7, -126, float(np.ldexp(2.0 - 2.0**-7, 127)), np.uint16),
}
_NUMPY_FLOATS = {"float64": np.float64, "float32": np.float32, "float16": np.float16}


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".")[0] == "torch"


def dtype_name(dtype: Any) -> str:
    """``'bfloat16'`` for ``torch.bfloat16``, ``np.float32``, ``'torch.float16'`` …"""
    text = str(dtype).removeprefix("torch.")
    try:
        return np.dtype(text).name if text != "bfloat16" else text
    except TypeError:
        return text


def float64(x: Any) -> np.ndarray:
    """``x`` as a float64 numpy array (exact for every stored float dtype, bfloat16 included).

    Example:
        >>> float64([[1, 2]]).dtype
        dtype('float64')
    """
    if isinstance(x, Stored):
        return x.values()
    if is_torch(x):
        import torch

        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":  # ml_dtypes' numpy bfloat16
        return stored(x).values()
    return x.astype(np.float64, copy=False)


@dataclass(frozen=True)
class Stored:
    """An array as stored: the bit pattern of every element and the dtype's name."""

    bits: np.ndarray
    dtype: str

    @property
    def format(self) -> FloatFormat:
        return FORMATS[self.dtype]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    def values(self) -> np.ndarray:
        """The stored values in float64 (exact)."""
        with np.errstate(invalid="ignore"):  # signalling NaN patterns stay NaN
            if self.dtype == "bfloat16":  # a bfloat16 is the top half of a float32
                return (self.bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            return self.bits.view(_NUMPY_FLOATS[self.dtype]).astype(np.float64)

    @property
    def T(self) -> Stored:  # noqa: N802 (numpy's name)
        return Stored(self.bits.T, self.dtype)


def check_dtype(name: str) -> str:
    if name not in FORMATS:
        raise ConfigError(f"unsupported stored dtype {name!r}: the storage measures take "
                          f"{', '.join(FORMATS)}")
    return name


def stored(x: Any) -> Stored:
    """``x`` (numpy array or torch tensor of a float dtype) with its bit patterns, as stored.

    Example:
        >>> s = stored(np.array([1.0, -0.0], dtype=np.float16))
        >>> s.dtype, s.bits.tolist()
        ('float16', [15360, 32768])
    """
    if isinstance(x, Stored):
        return x
    if is_torch(x):
        import torch

        name = check_dtype(dtype_name(x.dtype))
        signed = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        raw = x.detach().cpu().contiguous().view(signed).numpy()
        return Stored(raw.view(FORMATS[name].bits), name)
    x = np.asarray(x)
    name = check_dtype(x.dtype.name)
    return Stored(np.ascontiguousarray(x).view(FORMATS[name].bits), name)


def rounded(values: Any, dtype: Any) -> Stored:
    """Float64 ``values`` rounded once (to nearest, ties to even) into ``dtype``, as stored.

    Values the dtype holds are kept exactly, so ``rounded(stored(x).values(), x.dtype)`` is
    ``x``. Magnitudes past the largest finite value round to infinity as IEEE-754 says.

    Example:
        >>> rounded(np.array([1 + 2.0**-8 + 2.0**-30]), "bfloat16").values().tolist()
        [1.0078125]
    """
    name = check_dtype(dtype_name(dtype))
    v = float64(values)
    if name != "bfloat16":  # numpy's casts from float64 round once
        return stored(v.astype(_NUMPY_FLOATS[name]))
    fmt = FORMATS[name]
    with np.errstate(over="ignore", invalid="ignore"):
        magnitude = np.abs(v)
        _, exponent = np.frexp(magnitude)  # magnitude = f·2^exponent, f in [0.5, 1)
        # The quantum (ulp) at this magnitude; fixed below the normal range (subnormals).
        lead = np.maximum(exponent - 1, fmt.min_exponent)
        quantum = np.ldexp(1.0, lead - fmt.mantissa_bits)
        result = np.rint(magnitude / quantum) * quantum  # exact: scaling by a power of two
        result = np.where(result > fmt.max_finite, np.inf, result)
        result = np.where(np.isfinite(magnitude), result, magnitude)  # inf and NaN kept
        result = np.copysign(result, v)
    top = result.astype(np.float32).view(np.uint32) >> 16  # exact: a bfloat16 value
    return Stored(top.astype(np.uint16), name)


def ulp(x: Any) -> np.ndarray:
    """The gap from ``|x|`` to the next larger magnitude of its stored dtype (``np.spacing``'s
    meaning), float64; infinity at the largest finite value, NaN for NaN and ±inf.

    Computed from each value's exponent: ``2^(max(e, e_min) − p)`` for ``|x|`` in
    ``[2^e, 2^(e+1))``, ``p`` the dtype's fraction bits (bfloat16: 7), ``e_min`` its smallest
    normal exponent (zero and subnormals: the smallest subnormal).

    Example:
        >>> ulp(np.array([1.0, 3.0], dtype=np.float32)).tolist() == [2.0**-23, 2.0**-22]
        True
    """
    s = stored(x)
    return gaps(s.values(), s.dtype)


def gaps(values: np.ndarray, dtype: str) -> np.ndarray:
    """:func:`ulp` of float64 ``values`` that ``dtype`` holds exactly (a stored array's
    :meth:`Stored.values`, or a selection of them), by integer arithmetic on the float64
    exponent field: no logarithm, no temporary beyond the result."""
    fmt = FORMATS[check_dtype(dtype)]
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    if dtype == "float64":  # its own subnormal gaps do not fit the exponent trick
        with np.errstate(over="ignore", invalid="ignore"):
            gap = np.spacing(magnitude)
    else:
        biased = (magnitude.view(np.uint64) >> np.uint64(52)).astype(np.int64)  # e + 1023
        biased = np.maximum(biased, fmt.min_exponent + 1023)  # zero and subnormals
        gap = ((biased - fmt.mantissa_bits) << 52).view(np.float64)  # 2^(e - p), exact
    gap = np.where(magnitude == fmt.max_finite, np.inf, gap)
    return np.where(np.isfinite(magnitude), gap, np.nan)
