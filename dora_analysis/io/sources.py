"""Lazy tensor sources: one tensor (or one block of rows) at a time, never a whole state dict.

Every source answers two questions, ``keys()`` and ``get_tensor(name)``; ``info`` and ``get_rows``
have cheap overrides where the format allows (safetensors reads only the bytes asked for).
:func:`open_source` picks the class from a path (a registry of folder layouts, first match wins).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigError,
    UnsafeCheckpointError,
)

#: safetensors dtype strings → torch dtypes of the weights we analyse.
SAFETENSORS_FLOAT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                     "F64": torch.float64}
ANALYSABLE_DTYPES = frozenset(SAFETENSORS_FLOAT.values())
#: Every safetensors dtype string torch can hold (quantized weights are recognised by these).
SAFETENSORS_DTYPES = SAFETENSORS_FLOAT | {
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a str for stored dtypes torch does not analyse (``"F8_E4M3"``)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the 2-D view ``(out, in * prod(k))``."""
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def is_matrix(self) -> bool:
        """A floating weight with at least 2 dimensions: what Eqs. 2-4 apply to."""
        return self.dtype in ANALYSABLE_DTYPES and len(self.shape) >= 2 and 0 not in self.shape


class TensorSource(ABC):
    """A read-only, lazy view of one checkpoint's tensors."""

    path: Path

    @abstractmethod
    def keys(self) -> list[str]:
        """All tensor names, in stored order."""

    @abstractmethod
    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, as stored (no dtype conversion)."""

    def info(self, name: str) -> TensorInfo:
        t = self.get_tensor(name)
        return TensorInfo(tuple(t.shape), t.dtype)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the stored tensor (first dimension)."""
        return self.get_tensor(name)[start:stop]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: How safetensors rows are read: memory-mapped (the default; the touched file pages count in RSS
#: as shared page cache) or ``pread`` of exactly the rows' bytes into a private buffer (RSS stays
#: at the working set).
IO_BACKENDS: tuple[str, ...] = ("mmap", "pread")


class SafetensorsFile(TensorSource):
    """One ``.safetensors`` file; reads only the rows asked for (memory-mapped or ``pread``).

    The header is validated by ``safetensors`` itself. For ``pread`` the rows' byte range is read
    with ``os.pread`` (safetensors' own ``backend="pread"`` reads the whole tensor for a slice).
    """

    def __init__(self, path: str | Path, backend: str = "mmap") -> None:
        self.path = Path(path)
        self._backend = backend
        self._fd: int | None = None
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
            self._keys = list(self._file.keys())
            if backend == "pread":
                self._fd = os.open(self.path, os.O_RDONLY)
                with open(self.path, "rb") as f:
                    self._data_start = 8 + int.from_bytes(f.read(8), "little")
                    self._header = json.loads(f.read(self._data_start - 8))
        except Exception as exc:  # the Rust reader raises several types on corrupt input
            raise CheckpointFormatError(
                f"{self.path}: not a readable safetensors file ({_reason(exc)}); "
                "re-download or re-save it"
            ) from None

    def keys(self) -> list[str]:
        return list(self._keys)

    def _guard(self, name: str, read: Callable[[], object]):
        try:
            return read()
        except Exception as exc:  # the Rust reader raises several types on corrupt input
            raise CheckpointFormatError(
                f"{self.path}: cannot read tensor '{name}' ({_reason(exc)}); the file may be "
                "truncated or corrupt, re-download or re-save it"
            ) from None

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._guard(name, lambda: self._file.get_tensor(name))

    def info(self, name: str) -> TensorInfo:
        sl = self._guard(name, lambda: self._file.get_slice(name))
        stored = sl.get_dtype()
        return TensorInfo(tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(stored, stored))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self._fd is None:
            return self._guard(name, lambda: self._file.get_slice(name)[start:stop])
        return self._guard(name, lambda: self._pread_rows(name, start, stop))

    def _pread_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        entry = self._header[name]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = entry["shape"]
        stop = min(stop, shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        offset = self._data_start + entry["data_offsets"][0] + start * row_bytes
        size = max(0, stop - start) * row_bytes
        buffer = bytearray(size)
        view, done = memoryview(buffer), 0
        while done < size:  # pread may return fewer bytes than asked
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError("unexpected end of file")
            done += n
        if not size:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(-1, *shape[1:])

    def close(self) -> None:
        self._file = None  # safe_open releases its mmap when collected
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TorchFile(TensorSource):
    """A PyTorch ``.bin``/``.pt``/``.pth`` state dict, loaded with ``weights_only=True`` only.

    Memory-mapped where the file format allows it (zip format, torch ≥ 2.1). A dict holding the
    state dict under ``state_dict``/``model``/``module`` (training checkpoints) is unwrapped.
    """

    WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tensors = _tensor_dict(_torch_load(self.path), self.path, self.WRAPPER_KEYS)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def close(self) -> None:
        self._tensors = {}


def _torch_load(path: Path) -> object:
    def load(mmap: bool) -> object:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
            return load(mmap=False)  # legacy (non-zip) format cannot be memory-mapped
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: the file holds Python objects other than tensors "
            f"({_reason(exc).splitlines()[0]}); convert it to safetensors with code you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointFormatError(
            f"{path}: not a readable PyTorch checkpoint ({_reason(exc).splitlines()[0]}); "
            "re-download or re-save it"
        ) from None


def _tensor_dict(obj: object, path: Path, wrapper_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
        if tensors:
            return tensors
        for key in wrapper_keys:
            if isinstance(obj.get(key), dict):
                return _tensor_dict(obj[key], path, ())
    raise CheckpointFormatError(f"{path}: holds no state dict of tensors")


class ShardedCheckpoint(TensorSource):
    """Shards listed by a Hugging Face index (``*.index.json`` with a ``weight_map``)."""

    def __init__(self, index_path: str | Path, open_shard: Callable[[Path], TensorSource]) -> None:
        self.path = Path(index_path)
        try:
            weight_map = json.loads(self.path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointFormatError(
                f"{self.path}: not a valid shard index ({_reason(exc)}); it needs a "
                "'weight_map' object from tensor name to shard file"
            ) from None
        self._weight_map: dict[str, str] = weight_map
        self._open_shard = open_shard
        self._shards: dict[str, TensorSource] = {}
        missing = sorted({f for f in weight_map.values() if not (self.path.parent / f).is_file()})
        if missing:
            raise CheckpointNotFoundError(
                f"{self.path}: shard file(s) missing: {', '.join(missing)}; download all shards"
            )

    def _shard(self, name: str) -> TensorSource:
        file = self._weight_map[name]
        if file not in self._shards:
            self._shards[file] = self._open_shard(self.path.parent / file)
        return self._shards[file]

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._shard(name).get_tensor(name)

    def info(self, name: str) -> TensorInfo:
        return self._shard(name).info(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._shard(name).get_rows(name, start, stop)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "…"


Opener = Callable[[Path, str], TensorSource]  # (path, io backend) -> source

FILE_SUFFIXES: dict[str, Opener] = {
    ".safetensors": lambda p, backend: SafetensorsFile(p, backend),
    ".bin": lambda p, backend: TorchFile(p),
    ".pt": lambda p, backend: TorchFile(p),
    ".pth": lambda p, backend: TorchFile(p),
}

#: Folder layouts, in order of preference (each opened by :func:`open_file`).
FOLDER_LAYOUTS: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def open_file(path: Path, backend: str = "mmap") -> TensorSource:
    """Open one checkpoint file (or a shard index), chosen by suffix."""
    if path.name.endswith(".index.json"):
        inner = FILE_SUFFIXES.get(Path(path.name[: -len(".index.json")]).suffix)
        if inner is not None:
            return ShardedCheckpoint(path, lambda shard: inner(shard, backend))
    opener = FILE_SUFFIXES.get(path.suffix)
    if opener is None:
        known = ", ".join(FILE_SUFFIXES)
        raise CheckpointFormatError(f"{path}: unknown checkpoint file type (expected {known})")
    return opener(path, backend)


def open_folder(path: Path, backend: str = "mmap") -> TensorSource:
    """Open a model folder by its layout (see :data:`FOLDER_LAYOUTS`)."""
    if (path / "adapter_config.json").is_file():
        raise CheckpointFormatError(
            f"{path}: is an adapter folder; it is read merged with a base (give it as TUNED)"
        )
    for file in FOLDER_LAYOUTS:
        if (path / file).is_file():
            return open_file(path / file, backend)
    singles = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if len(singles) == 1:
        return SafetensorsFile(singles[0], backend)
    expected = ", ".join(FOLDER_LAYOUTS)
    found = f"{len(singles)} .safetensors files and no index" if singles else "none of them"
    raise CheckpointFormatError(f"{path}: no checkpoint found (looked for {expected}; {found})")


def open_source(path: str | Path, backend: str = "mmap") -> TensorSource:
    """Open a local checkpoint file or model folder lazily; quantized weights are dequantized.

    Example:
        >>> with open_source("model.safetensors") as src:  # doctest: +SKIP
        ...     w = src.get_tensor(src.keys()[0])
    """
    from .quant import dequantized  # late import: quant builds on this module

    if backend not in IO_BACKENDS:
        raise ConfigError(f"--io must be one of {', '.join(IO_BACKENDS)}, got {backend!r}")
    path = Path(path)
    if path.is_dir():
        return dequantized(open_folder(path, backend))
    if path.is_file():
        return dequantized(open_file(path, backend))
    raise CheckpointNotFoundError(f"{path}: no such file or folder")
