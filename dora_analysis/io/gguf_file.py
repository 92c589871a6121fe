"""GGUF files (llama.cpp), read through the ``gguf`` library (extra ``[gguf]``).

A GGUF fine-tune is compared with a Hugging Face base, so what llama.cpp's
``convert_hf_to_gguf.py`` changed on the way in is undone here:

* **names**: ``blk.N.attn_q.weight`` ↔ ``model.layers.N.self_attn.q_proj.weight`` by ``gguf``'s
  own ``TensorNameMap`` for the file's architecture (``general.architecture``): each tensor takes
  the name the base gives it, where the base has one (a GGUF base keeps GGUF's names);
* **row order of q/k** (architecture ``llama``): ``LlamaModel.modify_tensors`` permutes the rows
  of ``q_proj`` and ``k_proj`` (weights and biases) for llama.cpp's rotary layout,
  ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`` with
  ``n_head`` the attention heads for q and the key/value heads for k; the rows are read back
  in Hugging Face's order through the inverse permutation, head counts from the metadata
  (``llama.attention.head_count``, ``…head_count_kv``);
* **shapes**: GGUF stores dimensions innermost first (ggml's ``ne``); the reader reverses them,
  so a weight reads as ``(out, in)`` as stored by Hugging Face;
* **quantized types** (Q8_0, K-quants …) are dequantized to float32 by ``gguf.quants.dequantize``,
  row by row (a quantization block never spans two rows); F32, F16 and BF16 read as stored.

The file is memory-mapped read-only by the library; torch is not imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CheckpointFormatError, ConfigError
from .base import TensorInfo, TensorSource, reason
from .guard import shown

if TYPE_CHECKING:
    import torch

#: Architectures whose converter permutes the rows of q/k (``LlamaModel`` and its subclasses
#: that keep ``modify_tensors``' permutation write ``general.architecture = llama``).
PERMUTED_ARCHS = frozenset({"llama"})
#: GGUF tensor kinds (``gguf.MODEL_TENSOR`` names) whose rows are permuted, and whose head
#: count permutes them: q by the attention heads, k by the key/value heads.
PERMUTED = {"ATTN_Q": "head_count", "ATTN_K": "head_count_kv"}
#: GGUF types handed out as stored, by their torch name (BF16 as its bits, like safetensors).
PLAIN = {"F32": ("float32", np.dtype("<f4")), "F16": ("float16", np.dtype("<f2")),
         "BF16": ("bfloat16", np.dtype("<u2")), "F64": ("float64", np.dtype("<f8"))}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading .gguf files needs the gguf library; install it with "
                          "pip install 'dora-analysis[gguf]'") from None
    return gguf


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """For each Hugging Face row, the GGUF row that holds it: the inverse of the converter's
    ``LlamaModel.permute`` (rows ``(head, half, i)`` were stored as ``(head, i, half)``).

    Example:
        >>> unpermute_rows(8, 2).tolist()
        [0, 2, 1, 3, 4, 6, 5, 7]
    """
    if n_head <= 0 or n_rows % (2 * n_head):
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of two halves")
    half = n_rows // n_head // 2
    stored = np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2)  # (head, half, i)
    return stored.reshape(-1)


class GgufFile(TensorSource):
    """One ``.gguf`` file; names mapped to ``names_like``'s (the base's) where they correspond."""

    thread_safe = True  # slices of a read-only memory map; no state between reads

    def __init__(self, path: str | Path, names_like: Sequence[str] = ()) -> None:
        self.path = Path(path)
        gguf = _gguf()
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise CheckpointFormatError(f"{shown(self.path)}: not a readable GGUF file "
                                        f"({reason(exc)}); re-download or re-convert it") from None
        self._tensors = {t.name: t for t in reader.tensors}
        arch = self._field(reader, "general.architecture") or ""
        self._rows: dict[str, np.ndarray] = {}  # GGUF name → stored row of each HF row
        self._map = None  # gguf's TensorNameMap for the architecture, where it has one
        kinds = self._kinds(gguf, arch, reader)
        if arch in PERMUTED_ARCHS:
            for name, kind in kinds.items():
                if kind in PERMUTED:
                    heads = self._field(reader, f"{arch}.attention.{PERMUTED[kind]}")
                    if heads is None and kind == "ATTN_K":  # no GQA: as many as q
                        heads = self._field(reader, f"{arch}.attention.head_count")
                    self._rows[name] = self._unpermute(name, heads)
        self._names = self._hf_names(gguf, arch, reader, names_like)
        self._gguf_name = {v: k for k, v in self._names.items()}

    @staticmethod
    def _field(reader, key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    def _kinds(self, gguf, arch: str, reader) -> dict[str, str]:
        """Each tensor's kind (``ATTN_Q`` …) from its GGUF name, where the tables know it."""
        archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        if arch not in archs:
            return {}
        blocks = int(self._field(reader, f"{arch}.block_count") or 0)
        self._map = gguf.TensorNameMap(archs[arch], blocks)
        kinds = {}
        for name in self._tensors:
            kind = self._map.get_type(name, try_suffixes=(".weight", ".bias"))
            if kind is not None:
                kinds[name] = kind.name
        return kinds

    def _unpermute(self, name: str, heads) -> np.ndarray:
        rows = int(self._tensors[name].shape[-1])  # ne order: the outermost is the rows
        try:
            return unpermute_rows(rows, int(heads))
        except (TypeError, ValueError) as exc:
            raise CheckpointFormatError(
                f"{shown(self.path)}: tensor '{name}' cannot be put back in Hugging Face's row "
                f"order ({reason(exc)}; head counts from the metadata: {heads!r})") from None

    def _hf_names(self, gguf, arch: str, reader, names_like: Sequence[str]) -> dict[str, str]:
        """GGUF name → the name the base gives that tensor (GGUF's own where it has none)."""
        names = {n: n for n in self._tensors}
        if self._map is None:
            return names
        for other in names_like:
            gguf_name = self._map.get_name(other, try_suffixes=(".weight", ".bias"))
            if gguf_name in names and names[gguf_name] == gguf_name:
                names[gguf_name] = other
        return names

    def keys(self) -> list[str]:
        return sorted(self._gguf_name)

    def _tensor_of(self, name: str):
        try:
            return self._tensors[self._gguf_name[name]]
        except KeyError:
            raise KeyError(name) from None

    def info(self, name: str) -> TensorInfo:
        t = self._tensor_of(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne order → (out, in)
        plain = PLAIN.get(t.tensor_type.name)
        return TensorInfo(shape, plain[0] if plain else "float32")

    def read_rows(self, name: str, start: int, stop: int, *, expert: int | None = None,
                  buffer: np.ndarray | None = None) -> np.ndarray:
        t = self._tensor_of(name)
        data = t.data
        if expert is not None:
            data = data[expert]
        plain = PLAIN.get(t.tensor_type.name)
        order = self._rows.get(t.name)
        wanted = order[start:stop] if order is not None else np.arange(start, stop)
        if data.ndim == 0:
            rows = data
        elif data.ndim == 1 and plain is not None:  # a bias: q/k ones are permuted too
            per_value = plain[1].itemsize // data.dtype.itemsize  # BF16 is held as 2 bytes
            rows = data[(wanted[:, None] * per_value + np.arange(per_value)).ravel()]
        else:
            rows = data[wanted]
        if plain is not None:
            return np.ascontiguousarray(rows).view(plain[1])
        return _gguf().quants.dequantize(np.ascontiguousarray(rows), t.tensor_type)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        import torch

        rows = self.read_rows(name, start, stop)
        if self.info(name).dtype == "bfloat16":
            return torch.from_numpy(rows.copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(rows))

    def get_tensor(self, name: str) -> torch.Tensor:
        shape = self.info(name).shape
        if len(shape) <= 1:
            rows = self.get_rows(name, 0, shape[0] if shape else 1)
            return rows.reshape(shape)
        return self.get_rows(name, 0, shape[0]).reshape(shape)
