"""Quantized checkpoints: dequantized where plain torch can, refused by name otherwise.

Recognised from tensor names and dtypes (a registry, :data:`REFUSED` and the schemes below):

* FP8 with scales — ``W`` stored ``F8_E4M3``/``F8_E5M2`` plus ``weight_scale`` (per tensor, or per
  output channel ``(out, 1)``: compressed-tensors, FBGEMM) or ``weight_scale_inv`` (per
  128 × 128 block: DeepSeek-V3 style). ``W = fp8 · scale`` (``· scale_inv`` per block).
* bitsandbytes 8-bit (LLM.int8) — ``W`` stored ``I8`` plus ``SCB`` (out,): ``W = int8 · SCB / 127``.
* Refused with a message naming the format: bitsandbytes 4-bit (NF4/FP4, packed with nested
  absmax), GPTQ/AWQ (``qweight``/``qzeros``/``scales``), and FP8 weights with no scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CheckpointFormatError
from .base import TensorInfo, TensorSource

if TYPE_CHECKING:
    import numpy as np
    import torch

FP8 = ("float8_e4m3fn", "float8_e5m2")

#: (key suffix, format name): checkpoints that only their own library can dequantize.
REFUSED: tuple[tuple[str, str], ...] = (
    (".weight.quant_state.bitsandbytes__nf4", "bitsandbytes 4-bit (NF4)"),
    (".weight.quant_state.bitsandbytes__fp4", "bitsandbytes 4-bit (FP4)"),
    (".weight.absmax", "bitsandbytes 4-bit"),
    (".qweight", "GPTQ/AWQ"),
)
#: Auxiliary tensors that belong to a quantized weight and are not weights themselves.
AUXILIARY = (".SCB", ".weight_format", ".weight_scale", ".weight_scale_inv", ".input_scale")


@dataclass(frozen=True)
class Scheme:
    """How one stored weight becomes floats."""

    kind: str  # "scale" (per tensor / per row), "block" (scale_inv per block), "int8_rows"
    scale_name: str
    block: int = 128


class DequantizedSource(TensorSource):
    """A source whose quantized weights read as float32 rows (auxiliary tensors hidden)."""

    def __init__(self, inner: TensorSource, schemes: dict[str, Scheme]) -> None:
        self.path = inner.path
        self._inner = inner
        self.thread_safe = inner.thread_safe
        self._schemes = schemes
        self._scales: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return [k for k in self._inner.keys() if not k.endswith(AUXILIARY)]

    def info(self, name: str) -> TensorInfo:
        info = self._inner.info(name)
        return TensorInfo(info.shape, "float32") if name in self._schemes else info

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_rows(name, 0, self._inner.info(name).shape[0])

    def _scale(self, name: str) -> torch.Tensor:
        scheme = self._schemes[name]
        scale = self._scales.get(name)
        if scale is None:  # scales are small: (out,), (out, 1) or (out/128, in/128)
            import torch

            scale = self._inner.get_tensor(scheme.scale_name).to(torch.float32)
            self._scales = {name: scale}  # one kept; worker threads may replace it meanwhile
        return scale

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        if name in self._schemes:  # scales of quantized experts are not laid out per expert here
            raise CheckpointFormatError(f"{self.path}: tensor '{name}' is a quantized MoE expert "
                                        "tensor; dequantize the checkpoint first")
        return self._inner.get_expert_rows(name, expert, start, stop)

    def read_rows(self, name: str, start: int, stop: int, *, expert: int | None = None,
                  buffer: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        if name in self._schemes:  # dequantized by torch into a fresh float32 block anyway
            return super().read_rows(name, start, stop, expert=expert, buffer=buffer)
        return self._inner.read_rows(name, start, stop, expert=expert, buffer=buffer)

    def mapped(self, name: str) -> bool:
        return name not in self._schemes and self._inner.mapped(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        rows = self._inner.get_rows(name, start, stop)
        if name not in self._schemes:
            return rows
        import torch

        scheme, scale = self._schemes[name], self._scale(name)
        rows = rows.to(torch.float32)
        if scheme.kind == "int8_rows":
            return rows * _per_row(scale / 127.0, start, stop, rows.dim())
        if scheme.kind == "block":
            b = scheme.block
            per_row = scale[start // b : math.ceil(stop / b)].repeat_interleave(b, dim=0)
            per_row = per_row[start - (start // b) * b :][: stop - start]
            return rows * per_row.repeat_interleave(b, dim=1)[:, : rows.shape[1]]
        if scale.numel() == 1:
            return rows * scale.reshape(())
        return rows * _per_row(scale, start, stop, rows.dim())

    def will_read(self, names: Sequence[str]) -> None:
        self._inner.will_read([*names, *(self._schemes[n].scale_name for n in names
                                        if n in self._schemes)])

    @property
    def bytes_read(self) -> int | None:
        return self._inner.bytes_read

    def close(self) -> None:
        self._inner.close()


def _per_row(scale: torch.Tensor, start: int, stop: int, ndim: int) -> torch.Tensor:
    """Per-output-row scales ``start:stop`` shaped to broadcast over a block of ``ndim`` dims."""
    return scale.reshape(-1)[start:stop].reshape(-1, *[1] * (ndim - 1))


def dequantized(source: TensorSource) -> TensorSource:
    """Wrap ``source`` if it holds quantized weights; refuse formats plain torch cannot read."""
    keys = source.keys()
    key_set = set(keys)
    for suffix, fmt in REFUSED:
        hit = next((k for k in keys if k.endswith(suffix)), None)
        if hit is not None:
            raise CheckpointFormatError(
                f"{source.path}: {fmt} quantized weights (e.g. '{hit}') cannot be analysed "
                "directly; dequantize the model with its own library and save float weights")
    schemes = {}
    for name in keys:
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if f"{module}.SCB" in key_set:
            schemes[name] = Scheme("int8_rows", f"{module}.SCB")
        elif f"{name}_scale_inv" in key_set:
            schemes[name] = Scheme("block", f"{name}_scale_inv")
        elif f"{name}_scale" in key_set:
            schemes[name] = Scheme("scale", f"{name}_scale")
    unscaled = [n for n in keys if n not in schemes and n.endswith(".weight")
                and source.info(n).dtype in FP8]
    if unscaled:
        raise CheckpointFormatError(
            f"{source.path}: tensor '{unscaled[0]}' is FP8 without a weight_scale; its "
            "magnitudes are unknown — analyse the float checkpoint it was made from")
    return DequantizedSource(source, schemes) if schemes else source
