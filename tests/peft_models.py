"""Adapters made by PEFT itself on tiny models, with PEFT's own merged weights as the reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

peft = __import__("pytest").importorskip("peft")
transformers = __import__("pytest").importorskip("transformers")


@dataclass
class PeftCase:
    base: Path  # base weights (safetensors)
    adapter: Path  # adapter folder written by PeftModel.save_pretrained
    merged: Path  # PEFT's merge_and_unload weights (safetensors)
    method: str


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: merged models share tensors (tied weights) that safetensors refuses to save twice
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=3)
        self.head = nn.Linear(6, 4)


def _randomise(peft_model: nn.Module, seed: int) -> None:
    """Stand-in for training: non-zero B, and DoRA magnitudes moved off their initial norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(k in name for k in ("lora_B", "lora_embedding_A", "lora_embedding_B")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def make_case(root: Path, name: str, model_fn, config_kwargs: dict, seed: int = 0) -> PeftCase:
    folder = root / name
    folder.mkdir(parents=True)
    model = model_fn()
    save_file(_state(model), str(folder / "base.safetensors"))
    config = peft.LoraConfig(**config_kwargs)
    peft_model = peft.get_peft_model(model, config)
    _randomise(peft_model, seed)
    peft_model.save_pretrained(str(folder / "adapter"))
    merged = peft_model.merge_and_unload()
    save_file(_state(merged), str(folder / "merged.safetensors"))
    method = "dora" if config_kwargs.get("use_dora") else "lora"
    return PeftCase(folder / "base.safetensors", folder / "adapter", folder / "merged.safetensors",
                    method)


LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]  # down_proj is non-square (32 x 48)

CASES = {
    "lora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS}),
    "dora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS,
                          "use_dora": True}),
    "rslora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS,
                            "use_rslora": True, "use_dora": True}),
    "patterns": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS,
                              "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 32},
                              "use_dora": True}),
    "modules_to_save": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                     "modules_to_save": ["lm_head"]}),
    "embedding": (tiny_llama, {"r": 4, "lora_alpha": 8,
                               "target_modules": ["embed_tokens", "q_proj"], "use_dora": True}),
    "gpt2_lora": (tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"],
                              "fan_in_fan_out": True}),
    "gpt2_dora": (tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"],
                              "fan_in_fan_out": True, "use_dora": True}),
    "conv_dora": (TinyConv, {"r": 2, "lora_alpha": 4, "target_modules": ["conv", "head"],
                             "use_dora": True}),
}


def make_all(root: Path) -> dict[str, PeftCase]:
    return {name: make_case(root, name, fn, kwargs, seed=i)
            for i, (name, (fn, kwargs)) in enumerate(CASES.items())}
