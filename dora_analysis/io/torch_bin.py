"""PyTorch state-dict files (``.bin``, ``.pt``, ``.pth``), loaded with ``weights_only=True`` only:
a pickle that would run code is refused, never executed."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointChangedError, CheckpointFormatError, UnsafeCheckpointError
from .base import TensorInfo, TensorSource, reason
from .dtypes import name_of
from .guard import GuardedFile, shown


class TorchFile(TensorSource):
    """A PyTorch ``.bin``/``.pt``/``.pth`` state dict, loaded with ``weights_only=True`` only.

    Memory-mapped where the file format allows it (zip format, torch ≥ 2.1). A dict holding the
    state dict under ``state_dict``/``model``/``module`` (training checkpoints) is unwrapped.

    The tensors are views of the mapping, so a read lease (:mod:`dora_analysis.io.guard`) keeps
    writers out while they are in use; a pending break ends the read with an error. Without a
    lease the rows are copied between two identity checks: a change is reported, but a
    truncation that lands during the copy itself can still end the process (``SIGBUS``); convert
    such files to safetensors, which are read with ``pread`` then.
    """

    WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")

    thread_safe = True  # the tensors are loaded (or mapped) at open; a read keeps no state

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._guard = GuardedFile(self.path)
        try:
            loaded = _torch_load(self.path, self._guard.open_path)
            self._tensors = _tensor_dict(loaded, self.path, self.WRAPPER_KEYS)
        except BaseException:
            self._guard.close()
            raise

    def keys(self) -> list[str]:
        return list(self._tensors)

    def _checked(self, read):
        if self._guard.lease_broken():
            raise CheckpointChangedError(
                f"{shown(self.path)}: another process opened it for writing while it was being "
                "read; let it finish, then run again")
        self._guard.check()
        value = read() if self._guard.leased else read().clone()
        self._guard.check()
        return value

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._checked(lambda: self._tensors[name])

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._checked(lambda: self._tensors[name][start:stop])

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(tuple(t.shape), name_of(t.dtype))

    def close(self) -> None:
        self._tensors = {}
        self._guard.close()


def _torch_load(path: Path, open_path: str | None = None) -> object:
    """``path`` loaded with ``weights_only=True``; ``open_path`` is another name of the same
    file to open it by (a descriptor's ``/proc/self/fd/N``)."""
    open_path = open_path or str(path)

    def load(mmap: bool) -> object:
        return torch.load(open_path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
            return load(mmap=False)  # legacy (non-zip) format cannot be memory-mapped
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{shown(path)}: refused to unpickle: the file holds Python objects other than tensors "
            f"({reason(exc).splitlines()[0]}); convert it to safetensors with code you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        detail = reason(exc).splitlines()[0].replace(open_path, shown(path))
        raise CheckpointFormatError(
            f"{shown(path)}: not a readable PyTorch checkpoint ({detail}); "
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
    raise CheckpointFormatError(f"{shown(path)}: holds no state dict of tensors")
