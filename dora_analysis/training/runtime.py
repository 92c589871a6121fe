"""Where training runs: the device, the autocast precision, and the ``torchrun`` process group.

One process per accelerator under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the
environment): process *r* uses ``cuda:LOCAL_RANK``; on CPUs the group talks over gloo.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """The device this process trains on and its place in a ``torchrun`` job."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA, else Apple MPS, else CPU; a named accelerator must exist.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch "
                          f"{torch.__version__} (torch.cuda.is_available() is False); use "
                          "--device cpu, or install the CUDA build of torch")
    if name == "mps" and not has_mps:
        raise ConfigError("--device mps: Apple's MPS backend is not available here; "
                          "use --device cpu")
    if name == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def start(device_name: str) -> Runtime:
    """The device, and under ``torchrun`` the process group (NCCL on CUDA, gloo otherwise)."""
    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return Runtime(device)
    dist = torch.distributed
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank(), dist.get_world_size(),
                   int(os.environ.get("LOCAL_RANK", "0")))


def stop(runtime: Runtime) -> None:
    """Leave the process group started by :func:`start`."""
    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--dtype`` on ``device``; None for float32.

    ``auto``: bfloat16 on CUDA GPUs that support it (Ampere and later), float32 elsewhere.
    """
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return AUTOCAST.get(name)


def autocast(dtype: torch.dtype | None, device: torch.device):
    """Context in which forward and backward run in ``dtype`` (no-op for float32)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device
