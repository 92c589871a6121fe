"""Writes tests/data/torchtune/: a DoRA adapter made by torchtune 0.6.1 itself on a tiny LLaMA-3.

Run once (torchtune is unmaintained and pins an old torchao, so it is not a test dependency):

    pip install --target /tmp/tt --no-deps torchtune==0.6.1 torchao==0.11.0 omegaconf \
        antlr4-python3-runtime==4.9.3 kagglehub blobfile tiktoken sentencepiece
    PYTHONPATH=/tmp/tt python tests/data/make_torchtune_fixture.py

Files (what torchtune's LoRA recipes and checkpointer write, from torchtune's own functions):
  base.safetensors + config.json   the base in Hugging Face names and RoPE row order (tune_to_hf)
  adapter_model.pt                 get_adapter_state_dict: tune keys, q/k rows in Meta order
  peft/adapter_model.safetensors   tune_to_peft_adapter_weights (PEFT keys; lora_B permuted)
  peft/adapter_config.json         tune_to_peft_adapter_config (no use_dora)
  merged.safetensors               get_merged_lora_ckpt, then tune_to_hf: the reference
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchtune.models import convert_weights
from torchtune.models.llama3._component_builders import lora_llama3
from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt

HEADS, KV_HEADS, DIM, RANK, ALPHA = 4, 2, 32, 4, 8.0
OUT = Path(__file__).parent / "torchtune"

torch.manual_seed(0)
model = lora_llama3(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                    vocab_size=64, num_layers=2, num_heads=HEADS, num_kv_heads=KV_HEADS,
                    embed_dim=DIM, max_seq_len=64, intermediate_dim=48, lora_rank=RANK,
                    lora_alpha=ALPHA, use_dora=True)
for m in model.modules():  # DoRA magnitudes start at the base's row norms, as in training
    if hasattr(m, "initialize_dora_magnitude"):
        m.initialize_dora_magnitude()
g = torch.Generator().manual_seed(1)
with torch.no_grad():  # stand-in for training: B and the magnitudes move
    for name, p in model.named_parameters():
        if name.endswith("lora_b.weight"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("magnitude"):
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
state = {k: v.detach().clone() for k, v in model.state_dict().items()}
adapter = get_adapter_state_dict(state)
base = {k: v for k, v in state.items() if k not in adapter}
OUT.mkdir(exist_ok=True)
hf = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM)
save_file({k: v.contiguous() for k, v in convert_weights.tune_to_hf(base, **hf).items()},
          str(OUT / "base.safetensors"))
(OUT / "config.json").write_text(json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": 2}))
torch.save(adapter, OUT / "adapter_model.pt")
(OUT / "peft").mkdir(exist_ok=True)
peft = convert_weights.tune_to_peft_adapter_weights(adapter, **hf)
save_file({k: v.contiguous() for k, v in peft.items()},
          str(OUT / "peft" / "adapter_model.safetensors"))
config = convert_weights.tune_to_peft_adapter_config(
    {"r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                        "output_proj", "w1", "w2", "w3"],
     "peft_type": "LORA"})
(OUT / "peft" / "adapter_config.json").write_text(json.dumps(config))
merged = get_merged_lora_ckpt(dict(state), rank=RANK, alpha=ALPHA)
save_file({k: v.contiguous() for k, v in convert_weights.tune_to_hf(merged, **hf).items()},
          str(OUT / "merged.safetensors"))
print(sorted(adapter)[:4], {k: tuple(v.shape) for k, v in list(adapter.items())[:3]})
