"""Multi-process training under ``torchrun``: DDP replicas or FSDP2 shards, and full checkpoints.

* ``ddp``: every process holds the whole model; gradients are averaged in backward.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) splits every parameter across the
  processes, block by block (the transformer blocks a ``transformers`` model declares in
  ``_no_split_modules``, then the rest), for models that do not fit on one device.

Checkpoints stay complete either way: before a save every process takes part in gathering the
full tensors (``DTensor.full_tensor()``, a collective), and rank 0 alone writes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .runtime import Runtime


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


def is_main_process() -> bool:
    """Rank 0 under ``torch.distributed`` (torchrun), or the only process."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_sharded(model: nn.Module) -> bool:
    """Whether parameters are FSDP2 shards (``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_blocks(model: nn.Module) -> list[str]:
    """Names of the modules FSDP2 shards one by one: the model's own transformer blocks."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    return [name for name, m in model.named_modules() if name and type(m).__name__ in blocks]


def place(model: nn.Module, parallel: str, runtime: Runtime) -> nn.Module:
    """The model on this process's device, ready for a ``torchrun`` job.

    Alone: moved to the device. ``ddp``: moved and wrapped in ``DistributedDataParallel``.
    ``fsdp``: sharded block by block with ``fully_shard``, which moves only this process's
    shards to the device (so load the model on the CPU first).

    Example:
        >>> model = place(prepare(model, config), "fsdp", start("cuda"))  # doctest: +SKIP
    """
    if not runtime.distributed:
        return model.to(runtime.device)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        for name in shard_blocks(model):
            fully_shard(model.get_submodule(name), mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(runtime.device)
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def gathered_state(model: nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the state-dict entries ``keep`` selects.

    Shards are gathered, so every process must call this (in the same order); each gets the
    full tensors, and rank 0 writes them.
    """
    from torch.distributed.tensor import DTensor

    state = {}
    for name, tensor in unwrap(model).state_dict().items():
        if keep(name):
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            state[name] = tensor.detach().to("cpu").contiguous().clone()
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names, full tensors on CPU (collective).

    Example:
        >>> torch.save(optimizer_state(model, optimizer), "optimizer.pt")  # doctest: +SKIP
    """
    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put a state written by :func:`optimizer_state` back (sharded again under FSDP2)."""
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=is_sharded(model)))


def load_model_entries(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the named parameters (sharded again under FSDP2)."""
    if is_sharded(model):
        set_model_state_dict(model, state,
                             options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(unwrap(model).state_dict(keep_vars=True))
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
