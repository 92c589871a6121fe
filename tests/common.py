"""Builders of tiny real checkpoints (LLaMA-shaped, every matrix non-square) for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, KV, LAYERS = 24, 40, 8, 3


def llama_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A LLaMA-shaped state dict with every matrix non-square, plus norms and an int buffer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN - 8),  # deliberately non-square
        "self_attn.k_proj": (KV, HIDDEN - 8),
        "self_attn.v_proj": (KV, HIDDEN - 8),
        "self_attn.o_proj": (HIDDEN - 8, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN - 8),
        "mlp.up_proj": (INTER, HIDDEN - 8),
        "mlp.down_proj": (HIDDEN - 8, INTER),
    }
    state = {"model.embed_tokens.weight": torch.randn(50, HIDDEN - 8, generator=g)}
    for layer in range(LAYERS):
        for module, shape in shapes.items():
            state[f"model.layers.{layer}.{module}.weight"] = torch.randn(*shape, generator=g) / 4
        state[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(HIDDEN - 8)
    state["lm_head.weight"] = torch.randn(50, HIDDEN - 8, generator=g)
    state["model.rotary.position_ids"] = torch.arange(12).reshape(1, 12)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def perturb(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Full fine-tuning stand-in: W + scale·noise (row magnitudes and directions both move)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dim() >= 2:
            noise = torch.randn(v.shape, generator=g)
            out[k] = (v.double() + scale * noise).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def write_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> Path:
    """Write a Hugging Face sharded safetensors checkpoint with its index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


#: block_elements that make every matrix of :func:`wide_state` stream one row per block, so that
#: its two large matrices span several pieces (``dora_analysis.pairs.PIECE_BLOCKS`` rows each).
WIDE_BLOCK = 12


def wide_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Matrices with more rows than one piece holds at :data:`WIDE_BLOCK`: an embedding (output
    channels are its columns: summed across pieces) and a projection (rows: concatenated), in
    mixed stored dtypes, plus a small one."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(300, 12, generator=g).bfloat16(),
        "model.layers.0.mlp.down_proj.weight": (torch.randn(260, 20, generator=g) / 4).half(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(24, 16, generator=g) / 4,
    }
