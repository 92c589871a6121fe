"""Put LoRA/DoRA layers into any ``nn.Module`` by target-module names, take them out again, and
export what PEFT expects.

Targets match PEFT's rule for a list of names: a module whose full name equals a target or ends
with ``"." + target`` (``q_proj``, ``self_attn.q_proj``, ``query``, ``intermediate.dense`` …).
The target ``auto`` picks the attention query and value projections (PEFT's default for most
models, and the paper's setting), recognised by the analysis' module kinds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..errors import ConfigError
from ..io.keys import PEFT_PREFIX, module_kind
from .layers import ADAPTABLE, DoRALayer, LoRAConv1D, LoRALayer, adapter_classes

AUTO = "auto"
#: Parameter names that an adapter layer adds (PEFT's names behind ``PEFT_PREFIX``).
ADAPTER_PARAM = re.compile(r"\.lora_(A\.weight|B\.weight|embedding_A|embedding_B|"
                           r"magnitude_vector)$")


def matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT's rule for ``target_modules`` given as names."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def resolve_targets(model: nn.Module, targets: Iterable[str]) -> tuple[str, ...]:
    """Target names with ``auto`` replaced by the model's query and value projection names
    (``q_proj``, ``query``, GPT-2's fused ``c_attn`` …)."""
    targets = tuple(targets)
    if AUTO not in targets:
        return targets
    found: dict[str, list[str]] = {"q": [], "v": [], "qkv": []}
    for name, module in model.named_modules():
        kind = module_kind(name) if name else ""
        if kind in found and adapter_classes(module) is not None:
            found[kind].append(name.rsplit(".", 1)[-1])
    picked = found["q"] + found["v"] or found["qkv"]
    if not picked:
        raise ConfigError("--targets auto found no query/value projection in this model; name "
                          "the modules to adapt, e.g. --targets q_proj,v_proj")
    rest = tuple(t for t in targets if t != AUTO)
    return tuple(dict.fromkeys(picked)) + rest


def check_names(model: nn.Module, chosen: list[str], targets: tuple[str, ...],
                magnitude_only: list[str], modules_to_save: tuple[str, ...]) -> None:
    """Every target name adapts some module, every magnitude-only name one of those, and no
    target is a module trained in full (``modules_to_save``); else a :class:`ConfigError`."""
    unmatched = [t for t in targets if not any(matches(name, (t,)) for name in chosen)]
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if n and adapter_classes(m) is not None})
        which = "matches" if len(unmatched) == 1 else "match"
        raise ConfigError(f"--targets {','.join(unmatched)} {which} no adaptable module "
                          f"({ADAPTABLE}); such modules here end in: {', '.join(kinds)}")
    not_targets = [m for m in magnitude_only if not any(matches(name, (m,)) for name in chosen)]
    if not_targets:
        raise ConfigError(f"--magnitude-only {','.join(not_targets)}: no targeted module has "
                          f"that name (--targets {','.join(targets)}); it picks targets that "
                          "train only their magnitude")
    saved_in_full = [name for name in chosen if matches(name, modules_to_save)]
    if saved_in_full:
        raise ConfigError(f"--targets {','.join(targets)} includes {', '.join(saved_in_full)}, "
                          "which is trained in full (a new head); leave it out of --targets")


def inject_adapters(
    model: nn.Module, *, targets: Iterable[str], method: str, rank: int, alpha: float,
    dropout: float = 0.0, rslora: bool = False, detach_norm: bool = True,
    magnitude_only: Iterable[str] = (), modules_to_save: Iterable[str] = (),
) -> list[str]:
    """Replace the targeted modules in place (``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``,
    transformers ``Conv1D``, ``nn.Embedding``); returns their names.

    Only adapter parameters (and ``modules_to_save``, e.g. a new classifier head) stay trainable.
    ``magnitude_only`` targets (DoRA) train their magnitude alone (paper Table 6).

    Example:
        >>> names = inject_adapters(model, targets=["query", "value"], method="dora",
        ...                         rank=8, alpha=16)  # doctest: +SKIP
    """
    if method not in ("lora", "dora"):
        raise ConfigError(f"method must be 'lora' or 'dora', got {method!r}")
    targets, magnitude_only = resolve_targets(model, targets), list(magnitude_only)
    chosen, unsupported = [], []
    for name, module in model.named_modules():
        if not name or not matches(name, targets) or isinstance(module, LoRALayer):
            continue
        if adapter_classes(module) is not None:
            chosen.append(name)
        elif not list(module.children()):  # a leaf we cannot adapt (containers just match)
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ConfigError(f"--targets {','.join(targets)} matches modules that cannot take "
                          f"adapters: {', '.join(unsupported[:5])}; adaptable: {ADAPTABLE}")
    check_names(model, chosen, targets, magnitude_only, tuple(modules_to_save))
    for param in model.parameters():
        param.requires_grad_(False)
    for name in chosen:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        lora_cls, dora_cls = adapter_classes(base)
        try:
            if method == "dora":
                layer = dora_cls(base, rank, alpha, dropout=dropout, rslora=rslora,
                                 detach_norm=detach_norm,
                                 magnitude_only=matches(name, magnitude_only))
            else:
                layer = lora_cls(base, rank, alpha, dropout=dropout, rslora=rslora)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        setattr(parent, child, layer)
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            frozen_direction = isinstance(module, DoRALayer) and module.magnitude_only
            for factor in module.factor_parameters():
                factor.requires_grad_(not frozen_direction)
            if isinstance(module, DoRALayer):
                module.lora_magnitude_vector.requires_grad_(True)
        elif matches(name, modules_to_save):
            for param in module.parameters():
                param.requires_grad_(True)
    return chosen


def adapter_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (until :func:`unmerge_adapters`)."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def remove_adapters(model: nn.Module) -> nn.Module:
    """Merge and put the plain modules back: no inference overhead at all."""
    for name, layer in adapter_layers(model).items():
        layer.merge()
        parent, child = _parent(model, name)
        setattr(parent, child, layer.base_layer)
    return model


def is_adapter_entry(name: str, modules_to_save: Iterable[str] = ()) -> bool:
    """Whether a state-dict entry belongs in the adapter file: an adapter parameter, or a
    parameter of a ``modules_to_save`` module."""
    if ADAPTER_PARAM.search(name):
        return True
    module = name.rpartition(".")[0]
    parts = module.split(".")
    return any(matches(".".join(parts[: i + 1]), modules_to_save) for i in range(len(parts)))


def adapter_state_dict(model: nn.Module, modules_to_save: Iterable[str] = ()) -> dict:
    """Adapter weights under PEFT's saved names (``base_model.model.<module>.lora_A.weight`` …).

    Example:
        >>> save_file(adapter_state_dict(model), "adapter_model.safetensors")  # doctest: +SKIP
    """
    modules_to_save = tuple(modules_to_save)
    return {PEFT_PREFIX + name: t.detach().to("cpu").contiguous().clone()
            for name, t in model.state_dict().items() if is_adapter_entry(name, modules_to_save)}


def uses_fan_in_fan_out(model: nn.Module) -> bool:
    """PEFT's ``fan_in_fan_out``: the adapted layers store their weight ``(in, out)``
    (transformers ``Conv1D``)."""
    return any(isinstance(m, LoRAConv1D) for m in model.modules())

