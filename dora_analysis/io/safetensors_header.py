"""The safetensors header: one validator for every reader, local or remote, as strict as the
``safetensors`` library (0.8) itself.

A file is ``n`` (u64, little-endian), ``n`` bytes of UTF-8 JSON, then the data. The library parses
the JSON with serde into ``{"__metadata__": {str: str} | null, name: TensorInfo, …}`` and checks
that the tensors tile the data. :func:`parse_header` refuses exactly what it refuses — a BOM,
``NaN``, lone surrogate escapes, numbers out of range, nesting of 128 levels, non-string metadata
values, a shape ``[true, 4096]`` or ``[1.0]``, duplicate fields of a tensor, unknown dtypes,
overflowing shapes, sub-byte tensors that end mid-byte, holes, overlaps and uncovered bytes — and
accepts what it accepts (unknown fields of a tensor, a tensor given as ``[dtype, shape, offsets]``,
a dtype as ``{"F32": null}``, duplicate tensor names: the last wins). ``tests/io/test_header.py``
checks the verdicts against ``safe_open`` on generated and mutated headers.

Memory stays near the header's size: each tensor object is turned into a compact :class:`Entry`
by the parser's object hook as soon as it is read, with one tuple per distinct shape, and readers
decode the bytes (:func:`decode_header`) and let them go before parsing. ``json.loads`` of a
95 MiB header of 850 000 tensors holds 700+ MiB of dicts and lists, and so does the library's own
parser (``safe_open``), which the local reader therefore no longer calls.

Example:
    >>> raw = b'{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}'
    >>> parse_header(raw, 24, "m.safetensors")["w"]
    Entry(dtype='F32', shape=(2, 3), begin=0, end=24)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import CheckpointFormatError
from .guard import shown

#: safetensors' own cap on the JSON header (``MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000
#: Every dtype safetensors 0.8 knows, with its size in bits.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}
_USIZE_MAX = 2**64 - 1
_I64_MIN = -(2**63)
#: serde_json refuses the 128th level of nesting; the top-level object is the first.
_MAX_DEPTH = 127
_FIELDS = ("dtype", "shape", "data_offsets")
_FIELD_SET = frozenset(_FIELDS)


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor: its safetensors dtype name, shape, and byte range relative to the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def row_bytes(self) -> int:
        return (self.end - self.begin) // self.shape[0] if self.shape and self.shape[0] else 0


class Pairs(list):
    """A JSON object as parsed: its ``(key, value)`` pairs in order, duplicates kept."""


class _Refused(ValueError):
    pass


def _refuse_constant(name: str):
    raise _Refused(f"{name} is not JSON")


def _int(text: str) -> int | float:
    """An integer literal as serde_json reads it: beyond u64/i64 it is a float (never a usize),
    and one beyond f64 is out of range; ``-0`` is the float ``-0.0``."""
    if text == "-0":
        return -0.0
    value = int(text)
    if _I64_MIN <= value <= _USIZE_MAX:
        return value
    try:
        return float(value)
    except OverflowError:
        raise _Refused("number out of range") from None


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused("number out of range")
    return value


class _Bad:
    """A tensor-like object that is not a valid ``TensorInfo``: an error if it is a tensor's."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def header_length(first: bytes, file_size: int, where: object) -> int:
    """The header's length from the file's first 8 bytes, checked against the file's size."""
    if file_size < 8 or len(first) < 8:
        raise _invalid(where, f"{file_size} bytes: too small for a header")
    n = int.from_bytes(first[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise _invalid(where, f"header of {n} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise _invalid(where, f"header of {n} bytes in a file of {file_size}")
    return n


def decode_header(raw: bytes | bytearray | memoryview, where: object) -> str:
    """The header's bytes as text (strict UTF-8: no BOM-guessing, no surrogates), so that the
    caller can let go of the bytes before :func:`parse_header` builds the entries."""
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(where, f"header is not UTF-8 ({exc.reason} at byte {exc.start})"
                       ) from None


def parse_header(header: str | bytes | bytearray, data_bytes: int, where: object
                 ) -> dict[str, Entry]:
    """Validate a safetensors header (the ``n`` JSON bytes, or their text from
    :func:`decode_header`; ``data_bytes``: the bytes after it) as the safetensors library does;
    tensor name → :class:`Entry`.

    Raises :class:`~dora_analysis.errors.CheckpointFormatError` naming ``where`` and the reason.
    """
    text = header if isinstance(header, str) else decode_header(header, where)
    try:
        if _nesting(text) > _MAX_DEPTH:
            raise _Refused(f"header nested {_MAX_DEPTH + 1} levels deep or more")
        if _lone_surrogate(text):
            raise _Refused("a lone surrogate in a \\u escape")
        entries = _entries(text)
        _check_layout(entries, data_bytes)
    except _Refused as exc:
        raise _invalid(where, str(exc)) from None
    except RecursionError:
        raise _invalid(where, "header nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() over Python's digit limit
        raise _invalid(where, f"header is not JSON: {str(exc)[:120]}") from None
    return entries


def _invalid(where: object, why: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{shown(where)}: not a readable safetensors file ({why}); "
                                 "re-download or re-save it")


#: A JSON string (the unrolled form: linear, no backtracking).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting(text: str) -> int:
    """How deeply arrays and objects nest (strings skipped); at least the true depth when the
    text is not JSON (then the parser refuses it anyway)."""
    if text.count("[") + text.count("{") <= _MAX_DEPTH:
        return 0  # cannot reach the limit
    import numpy as np  # only for large headers; torch needs it anyway

    brackets = _STRING.sub("", text).encode("utf-8", "replace").translate(None, _NOT_BRACKETS)
    opens = np.frombuffer(brackets, dtype=np.uint8) >> 1 & 1  # [ { have bit 1 set, ] } not
    steps = opens.astype(np.int32) * 2 - 1
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def _lone_surrogate(text: str) -> bool:
    """serde_json refuses a ``\\uD800``-``\\uDFFF`` escape that is not a high one directly
    followed by a low one; Python keeps it. Escapes are read left to right, so ``\\\\`` is one."""
    if "\\u" not in text:
        return False
    pending = -1  # where a high surrogate's escape ended, waiting for its low half
    for match in _ESCAPE.finditer(text):
        code = int(match.group(1), 16) if match.group(1) else -1
        low = 0xDC00 <= code <= 0xDFFF
        if pending >= 0 and not (low and match.start() == pending):
            return True
        if pending < 0 and low:
            return True
        pending = match.end() if 0xD800 <= code <= 0xDBFF else -1
    return pending >= 0


def _entries(text: str) -> dict[str, Entry]:
    """Tensor name → entry. Each tensor object is turned into an :class:`Entry` (or a
    :class:`_Bad`) by the parser's object hook as soon as it is read: no dict per tensor."""
    shapes: dict[tuple, tuple] = {}  # one tuple per distinct shape
    last: list[Pairs] = []  # the pairs of the object read last: the top level, in the end
    unsized: list[Entry] = []  # entries whose byte count is still to be checked

    def on_object(pairs: list) -> object:
        last[:] = (pairs,)
        entry = _plain_entry(pairs, shapes)
        if entry is not None:
            return entry
        if not any(key in _FIELD_SET for key, _ in pairs) or all(
                type(v) is str for _, v in pairs):  # noqa: E721 - exactly str
            return Pairs(pairs)  # not a tensor (a metadata map, an unknown field's value)
        try:
            entry = _entry(Pairs(pairs))
        except _Refused as exc:
            return _Bad(str(exc))
        unsized.append(entry)
        return entry

    decoder = json.JSONDecoder(object_pairs_hook=on_object, parse_constant=_refuse_constant,
                               parse_int=_int, parse_float=_float)
    top = decoder.decode(text)
    if not isinstance(top, (Pairs, Entry, _Bad)):
        raise _Refused("header is not a JSON object")
    members = last[0]
    del last[:]
    entries: dict[str, Entry] = {}
    metadata_seen = False
    for name, value in members:
        if name == "__metadata__":
            if metadata_seen:
                raise _Refused("duplicate field `__metadata__`")
            metadata_seen = True
            _check_metadata(value)
            continue
        if isinstance(value, _Bad):
            raise _Refused(f"tensor '{name[:200]}' {value.why}")
        if not isinstance(value, Entry):
            try:
                value = _entry(value)
            except _Refused as exc:
                raise _Refused(f"tensor '{name[:200]}' {exc}") from None
            unsized.append(value)
        entries[name] = value
    # like safetensors, sizes are checked on the tensors kept (a duplicate name: the last)
    kept = {id(e): name for name, e in entries.items()} if unsized else {}
    for entry in unsized:
        if id(entry) in kept:
            try:
                _check_size(entry)
            except _Refused as exc:
                raise _Refused(f"tensor '{kept[id(entry)][:200]}' {exc}") from None
    return entries


def _check_metadata(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, Pairs):
        raise _Refused("__metadata__ is not an object of strings")
    bad = next((k for k, v in value if not isinstance(v, str)), None)
    if bad is not None:
        raise _Refused(f"__metadata__ value of '{bad}' is not a string")


def _usize(value: object) -> bool:
    return type(value) is int and 0 <= value <= _USIZE_MAX  # noqa: E721 - not bool, not float


def _plain_entry(pairs: list, shapes: dict[tuple, tuple]) -> Entry | None:
    """The common case, fast: ``{"dtype": "F32", "shape": [...], "data_offsets": [a, b]}``
    written in that order, valid (shapes shared by one tuple); None for anything else, which
    :func:`_entry` then judges."""
    if len(pairs) != 3:
        return None
    (k0, dtype), (k1, shape), (k2, offsets) = pairs
    if (k0 != "dtype" or k1 != "shape" or k2 != "data_offsets" or type(shape) is not list
            or type(offsets) is not list or len(offsets) != 2):  # noqa: E721 - not Pairs
        return None
    bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None  # noqa: E721
    begin, end = offsets
    if bits is None or type(begin) is not int or type(end) is not int:  # noqa: E721
        return None
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:  # noqa: E721 - not bool
            return None
        count *= d
        if count > _USIZE_MAX:  # overflows before a later 0 could save it, as in safetensors
            return None
    if not (0 <= begin <= end <= _USIZE_MAX and count * bits <= _USIZE_MAX
            and count * bits == (end - begin) * 8):
        return None
    key = tuple(shape)
    return Entry(dtype, shapes.setdefault(key, key), begin, end)


def _entry(spec: object) -> Entry:
    """One ``TensorInfo`` as serde reads a struct: an object with the three fields (others
    ignored), or the array ``[dtype, shape, data_offsets]``; its types checked (its size is
    checked by :func:`_check_size` once duplicates are resolved)."""
    if isinstance(spec, Pairs):
        fields: dict[str, object] = {}
        for key, value in spec:
            if key in _FIELD_SET:
                if key in fields:
                    raise _Refused(f"has a duplicate field `{key}`")
                fields[key] = value
        missing = [f for f in _FIELDS if f not in fields]
        if missing:
            raise _Refused(f"has no `{missing[0]}`")
        dtype, shape, offsets = (fields[f] for f in _FIELDS)
    elif isinstance(spec, list):
        if len(spec) != 3:
            raise _Refused("is neither an object nor a [dtype, shape, data_offsets] array")
        dtype, shape, offsets = spec
    else:
        raise _Refused("is not an object")
    if isinstance(dtype, Pairs) and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]  # serde's map form of a unit variant: {"F32": null}
    if type(dtype) is not str or dtype not in DTYPE_BITS:  # noqa: E721
        raise _Refused(f"has unknown dtype {str(dtype)[:40]!r}")
    if type(shape) is not list or not all(map(_usize, shape)):  # noqa: E721 - not Pairs
        raise _Refused(f"has an invalid shape {str(shape)[:60]}")
    if type(offsets) is not list or len(offsets) != 2 or not all(map(_usize, offsets)):  # noqa
        raise _Refused(f"has invalid data_offsets {str(offsets)[:60]}")
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_size(e: Entry) -> None:
    """The byte count matches the shape (with safetensors' u64 overflow checks)."""
    count = 1
    for d in e.shape:
        count *= d
        if count > _USIZE_MAX:
            raise _Refused(f"has a shape {list(e.shape)} that overflows")
    bits = count * DTYPE_BITS[e.dtype]
    if bits > _USIZE_MAX:
        raise _Refused(f"has a shape {list(e.shape)} that overflows")
    if bits % 8:
        raise _Refused(f"has {count} {e.dtype} values: not a whole number of bytes")
    if e.end >= e.begin and e.end - e.begin != bits // 8:
        raise _Refused(f"has {e.end - e.begin} bytes for shape {list(e.shape)} of {e.dtype}")


def _check_layout(entries: dict[str, Entry], data_bytes: int) -> None:
    """The byte ranges tile the data: sorted by offsets, each starts where the previous ended,
    and the last ends where the file does (holes, overlaps and leftovers are refused)."""
    import numpy as np

    n = len(entries)
    begins = np.fromiter((e.begin for e in entries.values()), dtype=np.uint64, count=n)
    ends = np.fromiter((e.end for e in entries.values()), dtype=np.uint64, count=n)
    order = np.lexsort((ends, begins))
    begins, ends = begins[order], ends[order]
    starts = np.concatenate([np.zeros(1, dtype=np.uint64), ends[:-1]])
    wrong = np.flatnonzero((begins != starts) | (ends < begins))
    if wrong.size:
        i = int(wrong[0])
        name = list(entries)[int(order[i])]
        raise _Refused(f"tensor '{name[:200]}' has offsets [{begins[i]}, {ends[i]}], expected a "
                       f"start at {starts[i]}")
    covered = int(ends[-1]) if n else 0
    if covered != data_bytes:
        raise _Refused(f"data is {data_bytes} bytes but the header covers {covered}; truncated?")
