"""Run by torchrun in tests/training/test_ddp.py: 2 CPU processes, gloo backend."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dora_analysis.training import TrainConfig, prepare, train


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial model on every rank
    config = TrainConfig(method="dora", targets=("fc1", "fc2"), rank=2, alpha=4, lr=0.05,
                         steps=3, save_steps=(3,), output=out / "run")
    model = DistributedDataParallel(prepare(Net(), config))

    def batch_at(i: int) -> dict:  # each rank its own data
        g = torch.Generator().manual_seed(100 * rank + i)
        return {"x": torch.randn(5, 8, generator=g), "y": torch.randint(0, 3, (5,), generator=g)}

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch["x"]), batch["y"])

    train(model, batch_at, config, loss_fn=loss_fn)
    weights = {n: p.detach().tolist() for n, p in model.module.named_parameters()
               if p.requires_grad}
    (out / f"rank{rank}.json").write_text(json.dumps(weights))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
