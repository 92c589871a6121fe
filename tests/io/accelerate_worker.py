"""Run by torchrun (2 CPU processes, gloo) from tests/io/test_dcp.py (slow): a tiny LLaMA sharded
with FSDP2 ``fully_shard`` and trained two steps; after each, accelerate's own
``save_fsdp_model`` (what HF Trainer calls, SHARDED_STATE_DICT) writes
``run/checkpoint-N/pytorch_model_fsdp_0/``. (accelerate enables FSDP only on accelerators, so the
sharding is done here and the save is accelerate's.) Also writes ``base/`` (HF
``save_pretrained`` before training) and ``step2.safetensors`` (the gathered weights after step 2);
then the same for a PEFT DoRA adapter (:func:`peft_run`).
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
    peft_run(out, mesh, accelerator, plugin)
    dist.destroy_process_group()


def peft_run(out: Path, mesh, accelerator, plugin) -> None:
    """A PEFT DoRA model of the saved base, FSDP2-sharded, saved as HF Trainer saves it under
    SHARDED_STATE_DICT: ``save_fsdp_model(..., adapter_only=True)`` (the adapter alone, as DCP, no
    adapter_config.json). The run's config goes into the run folder, as a final
    ``save_pretrained`` puts it; ``peft-step2/`` is the same adapter gathered, as a PEFT folder."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    rank = dist.get_rank()
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(out / "base"),
                           LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run = out / "peft-run"
    for step in (1, 2):
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 * rank + step))
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        save_fsdp_model(plugin, accelerator, model, str(run / f"checkpoint-{step}"),
                        adapter_only=True)
    gathered = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                for k, v in get_peft_model_state_dict(model).items()}
    if rank == 0:
        model.peft_config["default"].save_pretrained(run)
        model.peft_config["default"].save_pretrained(out / "peft-step2")
        save_file({k: v.contiguous() for k, v in gathered.items()},
                  str(out / "peft-step2" / "adapter_model.safetensors"))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
