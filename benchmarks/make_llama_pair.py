"""Generate a LLaMA-shaped base/tuned pair of sharded bf16 safetensors checkpoints (HF layout).

    python benchmarks/make_llama_pair.py --size 1b --out bench-output/pair-1b

writes ``OUT/base/`` and ``OUT/tuned/`` (``model-0000k-of-0000n.safetensors`` + index) and
``OUT/adapter/`` (a PEFT-format rank-16 DoRA adapter on every linear layer). The tuned weights are
the base plus a small dense update (~1e-3 relative, like full fine-tuning), so ΔD is around 1e-6 —
the regime where precision matters. Memory stays near one shard.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

#: name -> (hidden, intermediate, layers, vocab, kv_dim)
SIZES = {
    "tiny": (256, 688, 2, 1000, 64),
    "1b": (2048, 5632, 22, 32000, 256),  # TinyLlama-1.1B shapes
    "7b": (4096, 11008, 32, 32000, 4096),  # LLaMA-2-7B shapes
}


def tensor_shapes(size: str) -> dict[str, tuple[int, int]]:
    hidden, inter, layers, vocab, kv = SIZES[size]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def write_pair(size: str, out: Path, shard_bytes: int = 1 << 30, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(size)
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if used and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    n = len(shards)
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        base, tuned = {}, {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                w = torch.ones(shape)
                base[name], tuned[name] = w.bfloat16(), w.bfloat16()
                continue
            w = torch.randn(shape, generator=g) * 0.02
            base[name] = w.bfloat16()
            tuned[name] = (w + 3e-5 * torch.randn(shape, generator=g)).bfloat16()
            del w
        for name in names:
            weight_map[name] = file
        for folder, state in (("base", base), ("tuned", tuned)):
            (out / folder).mkdir(parents=True, exist_ok=True)
            save_file(state, str(out / folder / file), metadata={"format": "pt"})
        print(f"wrote shard {k + 1}/{n}", flush=True)
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    for folder in ("base", "tuned"):
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"{size}: {params / 1e9:.2f}B parameters, {total / 2**30:.2f} GiB each -> {out}")


ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(size: str, out: Path, rank: int = 16, seed: int = 1) -> None:
    """A PEFT-format DoRA adapter (all linear layers, rank ``rank``) for the generated base."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(size).items():
        module = name.removesuffix(".weight")
        if not module.endswith(ADAPTER_TARGETS):
            continue
        out_f, in_f = shape
        key = f"base_model.model.{module}"
        tensors[key + ".lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
        tensors[key + ".lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 1e-3
        # magnitudes near the base norms (0.02 * sqrt(in)), moved a little
        tensors[key + ".lora_magnitude_vector"] = 0.02 * in_f**0.5 * (
            1 + 1e-3 * torch.randn(out_f, generator=g))
    folder = out / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_dora": True,
              "target_modules": list(ADAPTER_TARGETS)}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    print(f"wrote a rank-{rank} DoRA adapter -> {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter-only", action="store_true",
                        help="only (re)write OUT/adapter for an existing pair")
    args = parser.parse_args()
    if not args.adapter_only:
        write_pair(args.size, args.out, seed=args.seed)
    write_adapter(args.size, args.out)


if __name__ == "__main__":
    main()
