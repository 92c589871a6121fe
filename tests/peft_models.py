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
    merged: Path | None  # PEFT's merge_and_unload weights (safetensors)
    method: str


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: merged models share tensors (tied weights) that safetensors refuses to save twice
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def tiny_llama(seed: int = 0, **config) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   **{"tie_word_embeddings": False, **config})
    return transformers.LlamaForCausalLM(cfg)


def tied_llama(seed: int = 0) -> nn.Module:
    """lm_head shares the input embedding's tensor; saved without lm_head.weight."""
    return tiny_llama(seed, tie_word_embeddings=True)


def biased_llama(seed: int = 0) -> nn.Module:
    """Attention and MLP layers with biases (for ``bias`` and ``lora_bias``)."""
    return tiny_llama(seed, attention_bias=True, mlp_bias=True)


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
    """Stand-in for training: non-zero B, DoRA magnitudes moved off their initial norms, KaSA's
    diagonal, trainable token rows and trainable biases moved."""
    g = torch.Generator().manual_seed(seed)

    def noise(p):
        return torch.randn(p.shape, generator=g).to(p.dtype)

    frozen_b = {n.replace("lora_B", "lora_A") for n, p in peft_model.named_parameters()
                if "lora_B" in n and not p.requires_grad}  # MiCA trains A against a fixed B
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            if name in frozen_b:
                p.add_(0.3 * noise(p))
            elif any(k in name for k in ("lora_B", "lora_embedding_A", "lora_embedding_B")):
                p.copy_(0.3 * noise(p))
            elif "modules_to_save" in name or "trainable_tokens_delta" in name \
                    or name.endswith("bias"):
                p.add_(0.05 * noise(p))
            elif "lora_magnitude_vector" in name or "lora_diag" in name:
                p.mul_(1 + 0.1 * noise(p))


def _save_base(model: nn.Module, folder: Path) -> Path:
    """The base as its library saves it: a tied model as transformers does (a folder whose
    model.safetensors omits lm_head.weight, with the config.json that ties it), else one file."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        model.save_pretrained(str(folder / "base"))
        return folder / "base"
    save_file(_state(model), str(folder / "base.safetensors"))
    return folder / "base.safetensors"


def make_case(root: Path, name: str, model_fn, config_kwargs: dict, seed: int = 0,
              dtype: torch.dtype = torch.float32, merge: bool = True) -> PeftCase:
    """Base, adapter and PEFT's own ``merge_and_unload`` weights (all in ``dtype``; no merged
    weights without ``merge``: for adapters PEFT cannot merge)."""
    folder = root / name
    folder.mkdir(parents=True)
    model = model_fn().to(dtype)
    base = _save_base(model, folder)
    config = peft.LoraConfig(**config_kwargs)
    peft_model = peft.get_peft_model(model, config)
    _randomise(peft_model, seed)
    peft_model.save_pretrained(str(folder / "adapter"))
    if not merge:
        return PeftCase(base, folder / "adapter", None, "lora")
    merged = peft_model.merge_and_unload()
    save_file(_state(merged), str(folder / "merged.safetensors"))
    method = "dora" if config_kwargs.get("use_dora") else "lora"
    return PeftCase(base, folder / "adapter", folder / "merged.safetensors", method)


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


#: LoRA variants and the other LoraConfig fields that change what is saved, made in float64
#: (PEFT merges in float64 too, so the reference is exact but for KaSA's float32 SVD).
VARIANT_CASES = {
    "kasa": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                          "kasa_config": {"beta": 1e-4, "gamma": 1e-3}}),
    "bdlora": (tiny_llama, {"r": 4, "lora_alpha": 8,
                            "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
                            "use_bdlora": {"target_modules_bd_a": ["o_proj", "down_proj"],
                                           "target_modules_bd_b": ["q_proj", "v_proj"],
                                           "nblocks": 2}}),
    "tokens": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                            "trainable_token_indices": [1, 5, 7]}),
    "tokens_by_module": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj"],
                                      "trainable_token_indices": {"embed_tokens": [0, 63]}}),
    "lora_bias": (biased_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"],
                                 "lora_bias": True}),
    "bias_all": (biased_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                "bias": "all"}),
    "bias_lora_only": (biased_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                      "bias": "lora_only", "use_dora": True}),
    "velora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                            "velora_config": {"num_groups": 4}}),
    "monteclora": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                "monteclora_config": {}}),
    "mica": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                          "init_lora_weights": "mica"}),
    "orthogonal": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["down_proj"],
                                "init_lora_weights": "orthogonal"}),
    "tied_lora_head": (tied_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj",
                                                                                "lm_head"]}),
    "tied_dora_head": (tied_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["lm_head"],
                                    "use_dora": True}),
    "tied_head_saved": (tied_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                     "modules_to_save": ["lm_head"]}),
    "tied_head_saved_tied": (tied_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                          "modules_to_save": ["lm_head"],
                                          "ensure_weight_tying": True}),
    "tied_tokens": (tied_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                 "trainable_token_indices": [3, 4]}),
}


#: Cases PEFT initialises only in float32 or lower.
FLOAT32_ONLY = frozenset({"mica", "orthogonal"})


def make_variants(root: Path, names=None) -> dict[str, PeftCase]:
    return {name: make_case(root, name, *VARIANT_CASES[name], seed=i,
                            dtype=torch.float32 if name in FLOAT32_ONLY else torch.float64)
            for i, name in enumerate(names or VARIANT_CASES)}


def make_all(root: Path) -> dict[str, PeftCase]:
    return {name: make_case(root, name, fn, kwargs, seed=i)
            for i, (name, (fn, kwargs)) in enumerate(CASES.items())}
