"""Run by torchrun (2 CPU processes, gloo) from tests/io/test_dcp.py (slow): a tiny LLaMA sharded
with FSDP2 ``fully_shard`` and trained two steps; after each, accelerate's own
``save_fsdp_model`` (what HF Trainer calls, SHARDED_STATE_DICT) writes
``run/checkpoint-N/pytorch_model_fsdp_0/``. (accelerate enables FSDP only on accelerators, so the
sharding is done here and the save is accelerate's.) Also writes ``base/`` (HF
``save_pretrained`` before training) and ``step2.safetensors`` (the gathered weights after step 2).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import save_fsdp_model
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    if rank == 0:
        model.save_pretrained(out / "base")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    for step in (1, 2):
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 * rank + step))
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        save_fsdp_model(plugin, accelerator, model, str(out / "run" / f"checkpoint-{step}"))
    whole = {k: v.full_tensor() for k, v in get_model_state_dict(model).items()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in whole.items()}, str(out / "step2.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
