"""Checkpoints that are already in memory: a state dict, or a live ``nn.Module``.

A module with LoRA/DoRA layers — PEFT's (``lora_A["default"]`` …) or this project's
(``LoRALinear`` …), found by their attributes, so neither package is imported — becomes the same
:class:`~dora_analysis.io.adapters.Adapter` that reading its saved PEFT folder gives: the
factors, the scale each layer uses, DoRA's magnitude, the orientation (``fan_in_fan_out``,
embeddings), and the weights trained in full next to them. Merged with a base by
:class:`~dora_analysis.merged.AdapterSource`, it is analysed by the code that analyses saved
adapters. Any other module is read as full weights from its state dict.

Example:
    >>> src = open_module(model, base=open_checkpoint("base/"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .adapter_checkpoint import AdapterCheckpoint
from .adapters import Adapter
from .base import TensorSource
from .factors import LowRankUpdate
from .keys import PEFT_PREFIX

F64 = torch.float64


class StateDictSource(TensorSource):
    """Tensors of a mapping (a state dict), read without copying until a row block is asked."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str | Path = "<memory>"):
        self.path = Path(str(path))
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach().cpu()

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name].detach()[start:stop].cpu()


def _adapter_name(module: nn.Module, where: str) -> str | None:
    """PEFT: the one active adapter of a layer; this project's layers (no adapter names): None."""
    if not isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
        return None
    active = list(getattr(module, "active_adapters", None) or ["default"])
    if len(active) != 1:
        raise ConfigError(f"{where}: {len(active)} active adapters ({', '.join(active)}); "
                          "activate one (model.set_adapter) to analyse it")
    return active[0]


def _factors(module: nn.Module, adapter: str | None):
    """``(A, B, is_embedding)`` of the layer's active adapter, or None if it has none."""
    if adapter is None:  # this project's layers
        if hasattr(module, "lora_embedding_A"):
            return module.lora_embedding_A, module.lora_embedding_B, True
        return module.lora_A.weight, module.lora_B.weight, False
    if adapter in module.lora_embedding_A:
        return module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], True
    if adapter in module.lora_A:
        return module.lora_A[adapter].weight, module.lora_B[adapter].weight, False
    return None


def _magnitude(module: nn.Module, adapter: str | None) -> torch.Tensor | None:
    store = getattr(module, "lora_magnitude_vector", None)
    if adapter is None:
        return store if isinstance(store, torch.Tensor) else None
    if isinstance(store, nn.ModuleDict) and adapter in store:
        return store[adapter].weight
    return None


def is_adapter_layer(module: nn.Module) -> bool:
    """A LoRA/DoRA layer: a frozen ``base_layer`` with low-rank factors (PEFT's or ours)."""
    return hasattr(module, "base_layer") and (hasattr(module, "lora_A")
                                              or hasattr(module, "lora_embedding_A"))


def layer_update(module: nn.Module, where: str) -> LowRankUpdate | None:
    """The update one adapter layer applies, in PEFT orientation (what :func:`read_peft` makes
    of its saved tensors); None if it has no factors for the active adapter."""
    if getattr(module, "merged", False):
        raise ConfigError(f"{where}: the adapter is merged into the base weight; unmerge it "
                          "first (or analyse the merged model against the base as full weights)")
    adapter = _adapter_name(module, where)
    _check_variant(module, adapter, where)
    found = _factors(module, adapter)
    if found is None:
        return None
    a, b, embedding = (x.detach() if isinstance(x, torch.Tensor) else x for x in found)
    scaling = module.scaling if adapter is None else module.scaling[adapter]
    magnitude = _magnitude(module, adapter)
    stored_in_out = (embedding or getattr(module, "fan_in_fan_out", False) is True
                     or type(module.base_layer).__name__ == "Conv1D")
    return LowRankUpdate(
        a.reshape(a.shape[0], -1).cpu(), b.reshape(b.shape[0], -1).cpu(),  # conv: kernel folded
        float(scaling),
        None if magnitude is None else magnitude.detach().to(F64).flatten().cpu(),
        stored_in_out=stored_in_out, dtype=a.dtype)


#: PEFT layer variants whose merge is ``W0 + s·B·A`` (or DoRA's, read from the magnitude):
#: anything else (KaSA, BD-LoRA, aLoRA, Arrow …) is refused here rather than read as plain LoRA.
PLAIN_VARIANTS = frozenset({
    "DoraLinearVariant", "DoraEmbeddingVariant", "DoraConv1dVariant", "DoraConv2dVariant",
    "DoraConv3dVariant", "MiCALinearVariant", "MiCAEmbeddingVariant", "VeloraLinearVariant",
    "MontecloraLinearVariant",
})


def _check_variant(module: nn.Module, adapter: str | None, where: str) -> None:
    variant = getattr(module, "lora_variant", {}).get(adapter) if adapter is not None else None
    if variant is not None and type(variant).__name__ not in PLAIN_VARIANTS:
        raise ConfigError(
            f"{where}: a PEFT {type(variant).__name__} layer is not read from memory; save the "
            "adapter (save_pretrained) and analyse the folder, which merges what PEFT saves "
            "(see docs/adapters.md)")


def _strip(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def module_adapter(model: nn.Module, label: str = "<model>") -> Adapter | None:
    """The adapter a module carries, or None when it has no adapter layers.

    Weights trained in full next to the adapters are kept as full weights: PEFT's
    ``modules_to_save`` copies, and (this project's layers) parameters outside adapter layers
    that require gradients.
    """
    updates: dict[str, LowRankUpdate] = {}
    full: dict[str, torch.Tensor] = {}
    inside: list[str] = []  # module paths whose parameters are accounted for
    for name, module in model.named_modules():
        if is_adapter_layer(module):
            update = layer_update(module, f"{label}: {name}")
            if update is not None:
                updates[_strip(name)] = update
            inside.append(name + ".")
        elif isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and hasattr(
                module, "original_module"):  # PEFT's ModulesToSaveWrapper
            adapter = _adapter_name_of_wrapper(module)
            if adapter is not None:
                for pname, param in module.modules_to_save[adapter].named_parameters():
                    full[f"{_strip(name)}.{pname}"] = param.detach()
            inside.append(name + ".")
    if not updates:
        return None
    peft_wrapped = any(n.startswith(PEFT_PREFIX) for n, _ in model.named_parameters())
    if not peft_wrapped:
        for name, param in model.named_parameters():
            if param.requires_grad and not any(name.startswith(p) for p in inside):
                full[name] = param.detach()
    config = getattr(model, "peft_config", None)
    base_model = None
    if isinstance(config, dict) and config:
        base_model = getattr(next(iter(config.values())), "base_model_name_or_path", None)
    return Adapter("in-memory", Path(label), updates, full, base_model=base_model)


def _adapter_name_of_wrapper(wrapper: nn.Module) -> str | None:
    active = getattr(wrapper, "active_adapters", None) or [getattr(wrapper, "active_adapter",
                                                                  "default")]
    active = [a for a in active if a in wrapper.modules_to_save]
    return active[0] if active else None


#: Attributes through which an adapter wrapper reaches the module it wraps, unchanged: adapter
#: layers (PEFT's tuner layers and this project's) hold it as ``base_layer``, PEFT's
#: ``modules_to_save`` and ``trainable_token_indices`` wrappers as ``original_module``.
WRAPPED_MODULE = ("original_module", "base_layer")


def wrapped_child(module: nn.Module) -> str | None:
    """The child through which a wrapper reaches the module it wraps (``base_layer``,
    ``original_module``, or the child holding it); None for a module that wraps nothing."""
    for attr in WRAPPED_MODULE:
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module):
            for name, child in module.named_children():
                if child is inner or any(m is inner for m in child.modules()):
                    return name
    return None


def base_weights(module: nn.Module, label: str = "base") -> dict[str, torch.Tensor]:
    """The pre-trained weights of a module, by the names it had before adapters were injected.

    ``peft.get_peft_model(base, config)`` injects into ``base`` in place: its ``q_proj`` becomes
    a LoRA layer whose ``base_layer`` holds W0 untouched (the factors and DoRA's magnitude sit
    beside it), and each ``modules_to_save`` module a wrapper whose ``original_module`` is the
    frozen original next to the trained copy. Read through those wrappers, the module gives the
    state dict it had before (``…q_proj.weight``, ``lm_head.weight``; the ``PeftModel`` itself
    without its ``base_model.model.`` prefix); a module without adapters gives its own state
    dict. A merged adapter layer holds W0 + ΔW, not W0: refused.
    """
    keep: dict[str, str] = {}  # wrapper's path → the child leading to the wrapped module
    for path, sub in module.named_modules(remove_duplicate=False):
        child = wrapped_child(sub)
        if child is None:
            continue
        if getattr(sub, "merged", False) is True:
            raise ConfigError(f"{label}: {path}: an adapter is merged into this layer, so its "
                              "weight is not the pre-trained one; unmerge it, or pass the base "
                              "as saved")
        keep[path] = child
    weights = {}
    for key, tensor in module.state_dict().items():
        path, name = "", []
        for part in key.split("."):
            wrapper = path in keep
            if wrapper and part != keep[path]:
                break  # the adapter's own tensors: factors, magnitudes, trained copies
            path = f"{path}.{part}" if path else part
            if not wrapper:
                name.append(part)
        else:
            weights[_strip(".".join(name))] = tensor  # a PeftModel given as its own base
    return weights


def open_module(model: nn.Module, base: TensorSource, label: str = "<model>"
                ) -> TensorSource | AdapterCheckpoint:
    """A live module as a tuned checkpoint: its adapter against ``base`` if it carries one
    (merged by :func:`dora_analysis.merged.merged`), else its own state dict (full weights)."""
    adapter = module_adapter(model, label)
    if adapter is not None:
        return AdapterCheckpoint(adapter, base)
    return StateDictSource(model.state_dict(), label)
