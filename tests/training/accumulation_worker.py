"""Run by torchrun in tests/training/test_ddp.py: 2 CPU processes (gloo), batch 2 × accumulation
2 per process under DDP and FSDP2, against one process with batch 8 on the same examples; each
process holds different numbers of target tokens. Rank 0 writes the relative L2 differences of
the first step's gradients."""

import json
import os
import sys
from pathlib import Path

import torch
import transformers
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dora_analysis.training.config import TrainConfig
from dora_analysis.training.data import IGNORE, Example, causal_batches, for_rank
from dora_analysis.training.distributed import place
from dora_analysis.training.loop import hf_loss, prepare, train
from dora_analysis.training.runtime import start, stop

WORLD, MICRO, ACCUM = 2, 2, 2


def examples() -> list[Example]:
    """8 examples of 4 to 25 tokens, the first 3 of each context, the rest targets."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(8):
        ids = torch.randint(1, 64, (4 + 3 * i,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * 3 + ids[3:], i + 1))
    return out


def model(config: TrainConfig):
    torch.manual_seed(0)  # the same initial model and adapters on every rank
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    prepared = prepare(transformers.LlamaForCausalLM(cfg), config)
    with torch.no_grad():  # B away from zero, so every factor has a gradient
        for name, param in prepared.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return prepared


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[name].flatten() for name in sorted(grads)])


def reference(data: list[Example]) -> torch.Tensor:
    """One process, batch 8, no accumulation: the plain mean over the batch's target tokens."""
    config = TrainConfig(method="dora", targets=("q_proj", "v_proj"), rank=2, alpha=4, steps=1)
    single = model(config)
    hf_loss(single, causal_batches(data, 0, MICRO * ACCUM * WORLD, seed=0)(0)).backward()
    return flat({n: p.grad for n, p in single.named_parameters() if p.requires_grad})


def distributed(data: list[Example], runtime, parallel: str) -> torch.Tensor:
    config = TrainConfig(method="dora", targets=("q_proj", "v_proj"), rank=2, alpha=4, steps=1,
                         lr=1e-6, batch_size=MICRO, grad_accum=ACCUM, max_grad_norm=None,
                         parallel=parallel, device="cpu")
    placed = place(model(config), parallel, runtime)
    names = {id(p): n.removeprefix("module.") for n, p in placed.named_parameters()}
    seen = {}

    def grab(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                seen[names[id(p)]] = grad.detach().clone()

    handle = register_optimizer_step_pre_hook(grab)
    try:
        batch_at = for_rank(causal_batches(data, 0, MICRO, seed=0), runtime.rank, WORLD)
        train(placed, batch_at, config)
    finally:
        handle.remove()
    return flat(seen)


def main(out: Path) -> None:
    runtime = start("cpu")
    data = examples()
    ref = reference(data)
    result = {}
    for parallel in ("ddp", "fsdp"):
        grads = distributed(data, runtime, parallel)
        result[parallel] = float((grads - ref).norm() / ref.norm())
    # the target tokens each process held at step 0 (they differ, or the test proves nothing)
    batch_at = for_rank(causal_batches(data, 0, MICRO, seed=0), runtime.rank, WORLD)
    result["tokens"] = sum(int((batch_at(i)["labels"][:, 1:] != IGNORE).sum())
                           for i in range(ACCUM))
    (out / f"rank{runtime.rank}.json").write_text(json.dumps(result))
    stop(runtime)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
