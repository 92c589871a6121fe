"""PyTorch state-dict files (``.bin``, ``.pt``, ``.pth``), loaded with ``weights_only=True`` only:
a pickle that would run code is refused, never executed."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointFormatError, UnsafeCheckpointError
from .base import TensorInfo, TensorSource, reason


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
            f"({reason(exc).splitlines()[0]}); convert it to safetensors with code you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointFormatError(
            f"{path}: not a readable PyTorch checkpoint ({reason(exc).splitlines()[0]}); "
            "re-download or re-save it"
        ) from None


def _tensor_dict(obj: object, path: Path, wrapper_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        # detached: saved Parameters (DeepSpeed's ``module``) load with requires_grad=True
        tensors = {k: v.detach() for k, v in obj.items()
                   if isinstance(k, str) and torch.is_tensor(v)}
        if tensors:
            return tensors
        for key in wrapper_keys:
            if isinstance(obj.get(key), dict):
                return _tensor_dict(obj[key], path, ())
    raise CheckpointFormatError(f"{path}: holds no state dict of tensors")
