"""Put LoRA/DoRA layers into any ``nn.Module`` by target-module names, take them out again, and
export what PEFT expects.

Targets match PEFT's rule for a list of names: a module whose full name equals a target or ends
with ``"." + target`` (``q_proj``, ``self_attn.q_proj``, ``query``, ``intermediate.dense`` …).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .layers import DoRALinear, LoRALinear

PEFT_PREFIX = "base_model.model."


def matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT's rule for ``target_modules`` given as names."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def inject_adapters(
    model: nn.Module, *, targets: Iterable[str], method: str, rank: int, alpha: float,
    dropout: float = 0.0, rslora: bool = False, detach_norm: bool = True,
    magnitude_only: Iterable[str] = (), modules_to_save: Iterable[str] = (),
) -> list[str]:
    """Replace the targeted ``nn.Linear`` modules in place; returns their names.

    Only adapter parameters (and ``modules_to_save``, e.g. a new classifier head) stay trainable.
    ``magnitude_only`` targets (DoRA) train their magnitude alone (paper Table 6).

    Example:
        >>> names = inject_adapters(model, targets=["query", "value"], method="dora",
        ...                         rank=8, alpha=16)  # doctest: +SKIP
    """
    if method not in ("lora", "dora"):
        raise ValueError(f"method must be 'lora' or 'dora', got {method!r}")
    targets, magnitude_only = list(targets), list(magnitude_only)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linear if matches(n, targets)]
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"no nn.Linear module matches --targets {','.join(targets)}; linear "
                         f"modules here end in: {', '.join(kinds)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in chosen:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        if method == "dora":
            layer = DoRALinear(base, rank, alpha, dropout=dropout, rslora=rslora,
                               detach_norm=detach_norm,
                               magnitude_only=matches(name, magnitude_only))
        else:
            layer = LoRALinear(base, rank, alpha, dropout=dropout, rslora=rslora)
        setattr(parent, child, layer)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            frozen_direction = isinstance(module, DoRALinear) and module.magnitude_only
            for factor in (module.lora_A, module.lora_B):
                factor.weight.requires_grad_(not frozen_direction)
            if isinstance(module, DoRALinear):
                module.lora_magnitude_vector.requires_grad_(True)
        elif matches(name, modules_to_save):
            for param in module.parameters():
                param.requires_grad_(True)
    return chosen


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (until :func:`unmerge_adapters`)."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def remove_adapters(model: nn.Module) -> nn.Module:
    """Merge and put the plain ``nn.Linear`` modules back: no inference overhead at all."""
    for name, layer in adapter_layers(model).items():
        layer.merge()
        parent, child = _parent(model, name)
        setattr(parent, child, layer.base_layer)
    return model


def adapter_state_dict(model: nn.Module, modules_to_save: Iterable[str] = ()) -> dict:
    """Adapter weights under PEFT's saved names (``base_model.model.<module>.lora_A.weight`` …)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model).items():
        key = PEFT_PREFIX + name
        state[f"{key}.lora_A.weight"] = layer.lora_A.weight
        state[f"{key}.lora_B.weight"] = layer.lora_B.weight
        if isinstance(layer, DoRALinear):
            state[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    for name, module in model.named_modules():
        if name and matches(name, modules_to_save):
            for pname, param in module.named_parameters():
                state[f"{PEFT_PREFIX}{name}.{pname}"] = param
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

