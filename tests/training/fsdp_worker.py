"""Run by torchrun in tests/training/test_distributed.py: 2 CPU processes (gloo) train a tiny
LLaMA with DDP and with FSDP2, save, and resume; rank 0 writes what the test compares."""

import json
import os
import sys
from pathlib import Path

import torch
import transformers
from torch.distributed.fsdp import FSDPModule

from dora_analysis.training.config import TrainConfig
from dora_analysis.training.distributed import gathered_state, place, unwrap
from dora_analysis.training.loop import prepare, train
from dora_analysis.training.runtime import start, stop


def tiny_llama():
    torch.manual_seed(0)  # the same initial model on every rank
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def run(out: Path, runtime, parallel: str, method: str, resume: Path | None = None) -> dict:
    name = f"{parallel}-{method}" + ("-resumed" if resume else "")
    config = TrainConfig(method=method, targets=("q_proj", "v_proj"), rank=2, alpha=4, lr=0.02,
                         steps=3, save_steps=(2,), output=out / name, parallel=parallel,
                         device="cpu", dropout=0.1 if method == "dora" else 0.0)
    model = place(prepare(tiny_llama(), config), parallel, runtime)

    def batch_at(i: int) -> dict:  # each rank its own data
        g = torch.Generator().manual_seed(100 * runtime.rank + i)
        ids = torch.randint(0, 64, (3, 10), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    result = train(model, batch_at, config, resume=resume)
    trainable = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    final = gathered_state(model, lambda n: n in trainable)  # collective
    return {"name": name, "losses": result.losses, "saved": [str(p) for p in result.checkpoints],
            "weights": {k: v.tolist() for k, v in final.items()},
            "sharded": sum(isinstance(m, FSDPModule) for m in model.modules())}


def main(out: Path) -> None:
    runtime = start("cpu")
    runs = [run(out, runtime, "ddp", "dora"), run(out, runtime, "fsdp", "dora"),
            run(out, runtime, "fsdp", "lora"), run(out, runtime, "fsdp", "ft")]
    runs.append(run(out, runtime, "fsdp", "dora", resume=out / "fsdp-dora" / "checkpoint-2"))
    (out / f"rank{runtime.rank}.json").write_text(json.dumps(runs))
    stop(runtime)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
