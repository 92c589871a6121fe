"""DoRA / LoRA / full fine-tuning that produces the checkpoints the analysis compares (SPEC §7).

Uses the core only through its file formats; the core never imports this package. Names are
imported on first use, so ``dora-train --help`` (and this import) need no torch.

Example:
    >>> from dora_analysis.training import TrainConfig, prepare, train  # doctest: +SKIP
    >>> config = TrainConfig(method="dora", targets=("query", "value"))  # doctest: +SKIP
    >>> model = prepare(model, config)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": ".config",
    "DoRAConv": ".layers", "DoRAConv1D": ".layers", "DoRAEmbedding": ".layers",
    "DoRALinear": ".layers", "LoRAConv": ".layers", "LoRAConv1D": ".layers",
    "LoRAEmbedding": ".layers", "LoRALinear": ".layers",
    "inject_adapters": ".inject", "merge_adapters": ".inject", "remove_adapters": ".inject",
    "unmerge_adapters": ".inject",
    "prepare": ".loop", "train": ".loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
