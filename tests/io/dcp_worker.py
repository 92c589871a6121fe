"""Run by torchrun (2 CPU processes, gloo) from tests/io/test_dcp.py: DCP saves whose tensors are
split over both ranks, written by ``torch.distributed.checkpoint.save`` itself.

* ``dtensor/``: ``{"model": sd}`` (accelerate's nesting) of DTensors placed ``Shard(0)`` (rows,
  uneven), ``Shard(1)`` (columns) and ``Replicate``, plus a 3-D tensor and a Python value.
* ``fsdp2/``: a small model sharded by FSDP2 ``fully_shard``, its ``get_model_state_dict``
  saved the way accelerate does, beside optimizer state (torchtitan-style top level).
* ``reference.safetensors``: the same tensors, whole (rank 0).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "rows.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),  # 4 + 3 rows
        "cols.weight": torch.randn(6, 9, generator=g),  # 5 + 4 columns
        "bias": torch.randn(6, generator=g),  # replicated: one chunk
        "conv.weight": torch.randn(5, 3, 2, 2, generator=g),  # 3-D+ rows split
    }


PLACEMENTS = {"rows.weight": Shard(0), "cols.weight": Shard(1), "bias": Replicate(),
              "conv.weight": Shard(0)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.layers = nn.ModuleList([nn.Linear(6, 10), nn.Linear(10, 6)])
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(h)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = tensors()
    sd = {name: distribute_tensor(t, mesh, [PLACEMENTS[name]]) for name, t in full.items()}
    dcp.save({"model": sd | {"epoch": 3}}, checkpoint_id=out / "dtensor")

    torch.manual_seed(0)
    model = Net()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.arange(8).reshape(2, 4) % 11).sum().backward()
    optim.step()
    model_sd = get_model_state_dict(model)
    dcp.save({**model_sd, "optimizer": get_optimizer_state_dict(model, optim),
              "train_state": {"step": torch.tensor(1)}}, checkpoint_id=out / "fsdp2")
    whole = {k: v.full_tensor() for k, v in model_sd.items()}
    if rank == 0:
        save_file(full, str(out / "reference.safetensors"))
        save_file(whole, str(out / "fsdp2_reference.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
