"""Run by torchrun (2 CPU processes, gloo) for tests/io/test_deepspeed.py: real DeepSpeed ZeRO-1,
2 and 3 checkpoints of a tiny LLaMA-shaped model, and DeepSpeed's own fp32 rebuild of each.

The model has what makes ZeRO's bookkeeping non-trivial: two parameter groups (weight decay and
none), odd element counts (partition padding), a frozen parameter, a tied (shared) weight and a
buffer. Every matrix is non-square.

Writes into OUT:
* ``base.safetensors``: the weights before training (fp32).
* ``zero{1,2,3}/``: ``engine.save_checkpoint`` after 3 steps (``global_step3/`` + ``latest``).
* ``zero{1,2,3}_fp32.safetensors``: ``get_fp32_state_dict_from_zero_checkpoint`` of it.
* ``trainer/checkpoint-3/``: ZeRO-2 as HF Trainer leaves it: ``global_step3/``, ``latest`` and the
  16-bit ``model.safetensors`` beside.
* ``run3/checkpoint-{2,4}/``: a ZeRO-3 series without gathered 16-bit weights.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.comm.torch  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

# The shared-memory all-reduce kernel is C++ compiled on first use (minutes); gloo does the job.
deepspeed.comm.torch.build_shm_op = lambda: None


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(13, 6)
        self.q_proj = nn.Linear(6, 10, bias=False)
        self.k_proj = nn.Linear(6, 4, bias=False)  # frozen
        self.v_proj = nn.Linear(6, 5, bias=False)
        self.up_proj = nn.Linear(6, 7)
        self.down_proj = nn.Linear(7, 6, bias=False)
        self.norm = nn.LayerNorm(6)
        self.lm_head = nn.Linear(6, 13, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied
        self.register_buffer("inv_freq", torch.linspace(1.0, 0.1, 3))
        self.k_proj.weight.requires_grad_(False)

    def forward(self, x):
        h = self.embed_tokens(x)
        h = h + self.q_proj(h)[..., :6] * self.k_proj(h).sum(-1, keepdim=True)
        h = h + self.v_proj(h).sum(-1, keepdim=True) * self.inv_freq.sum()
        h = self.norm(h + self.down_proj(torch.relu(self.up_proj(h))))
        return self.lm_head(h)


def engine_for(stage: int):
    torch.manual_seed(0)
    model = Tiny()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10_000,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return model, engine


def train_step(engine, step: int) -> None:
    g = torch.Generator().manual_seed(100 * engine.global_rank + step)
    x = torch.randint(0, 13, (2, 5), generator=g)
    loss = engine(x).float().logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    if rank == 0:
        torch.manual_seed(0)
        save_file({k: v.clone() for k, v in Tiny().state_dict().items()},
                  str(out / "base.safetensors"))
    for stage in (1, 2, 3):
        model, engine = engine_for(stage)
        for step in range(3):
            train_step(engine, step)
        engine.save_checkpoint(str(out / f"zero{stage}"))
        if stage == 2:
            engine.save_checkpoint(str(out / "trainer" / "checkpoint-3"))
            if rank == 0:  # HF Trainer saves the 16-bit weights beside (ZeRO-1/2)
                state = {k: v.clone() for k, v in engine.module.state_dict().items()}
                save_file(state, str(out / "trainer" / "checkpoint-3" / "model.safetensors"))
        if stage == 3:
            model, engine = engine_for(3)
            for step in range(4):
                train_step(engine, step)
                if step in (1, 3):
                    engine.save_checkpoint(str(out / "run3" / f"checkpoint-{step + 1}"))
    deepspeed.comm.barrier()
    if rank == 0:
        for stage in (1, 2, 3):
            state = get_fp32_state_dict_from_zero_checkpoint(str(out / f"zero{stage}"))
            save_file({k: v.contiguous().clone() for k, v in state.items()},
                      str(out / f"zero{stage}_fp32.safetensors"))
    deepspeed.comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
