"""Stored element types by name: what a reader needs to plan and read a tensor without torch.

A :class:`~dora_analysis.io.base.TensorInfo` names its dtype by torch's name for it
(``"bfloat16"``, also the table's ``dtype`` column); this table says how many bytes an element
takes, how readers hand its rows out as numpy arrays (``bfloat16``, which numpy lacks, as its
16 bits in ``uint16``), its precision, its safetensors code, and — only when asked — the torch
dtype itself.

Example:
    >>> DTYPES["bfloat16"].itemsize, DTYPES["bfloat16"].numpy, DTYPES["bfloat16"].unit_roundoff
    (2, dtype('uint16'), 0.00390625)
    >>> from_safetensors("F8_E4M3"), from_safetensors("F8_E8M0")
    ('float8_e4m3fn', 'F8_E8M0')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type a checkpoint may store."""

    name: str
    """torch's name (``torch.<name>``)."""
    safetensors: str
    """The safetensors code (``BF16``)."""
    itemsize: int
    """Bytes per element."""
    storage: str | None
    """The numpy type readers hand the stored elements out as (bfloat16 as its bits, ``<u2``);
    None where numpy has no exact equivalent (float8: read through torch)."""
    significand: int = 0
    """Significand bits of a floating type, the implicit one included (bf16: 8); 0 otherwise."""

    @property
    def numpy(self) -> np.dtype | None:
        """:attr:`storage` as a numpy dtype (imports numpy)."""
        import numpy as np

        return None if self.storage is None else np.dtype(self.storage)

    @property
    def analysable(self) -> bool:
        """Eqs. 2-4 apply to weights of this type (the floating types the kernel widens)."""
        return self.name in ANALYSABLE

    @property
    def unit_roundoff(self) -> float:
        """Half the gap between 1 and the next value (bf16: 2⁻⁸); 0 for integers."""
        return 2.0 ** -self.significand if self.significand else 0.0

    def torch(self):
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)


#: Every element type torch reads from safetensors, by torch's name.
DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("bfloat16", "BF16", 2, "<u2", 8),
    DType("float16", "F16", 2, "<f2", 11),
    DType("float32", "F32", 4, "<f4", 24),
    DType("float64", "F64", 8, "<f8", 53),
    DType("float8_e4m3fn", "F8_E4M3", 1, None, 4),
    DType("float8_e5m2", "F8_E5M2", 1, None, 3),
    DType("int8", "I8", 1, "i1"),
    DType("uint8", "U8", 1, "u1"),
    DType("int16", "I16", 2, "<i2"),
    DType("int32", "I32", 4, "<i4"),
    DType("int64", "I64", 8, "<i8"),
    DType("bool", "BOOL", 1, "?"),
)}
#: The floating types the analysis reads weights in.
ANALYSABLE = frozenset({"bfloat16", "float16", "float32", "float64"})
_BY_SAFETENSORS = {d.safetensors: d.name for d in DTYPES.values()}


def from_safetensors(code: str) -> str:
    """torch's name for a safetensors dtype code; the code itself for types torch cannot hold
    (``F8_E8M0``, ``F4`` …, refused by name when such a weight is read)."""
    return _BY_SAFETENSORS.get(code, code)


def name_of(dtype: object) -> str:
    """The name of a torch dtype (``torch.bfloat16`` → ``"bfloat16"``) or of a name itself."""
    return str(dtype).removeprefix("torch.")


def unit_roundoff(dtype: object) -> float:
    """The unit roundoff of a float type given by name or as a torch dtype; 0 if unknown or not a
    float.

    Example:
        >>> unit_roundoff("float16"), unit_roundoff("int8"), unit_roundoff("F4")
        (0.00048828125, 0.0, 0.0)
    """
    known = DTYPES.get(name_of(dtype))
    return known.unit_roundoff if known is not None else 0.0
