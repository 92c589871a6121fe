"""DoRA / LoRA / full fine-tuning that produces the checkpoints the analysis compares (SPEC §7).

Uses the core only through its file formats; the core never imports this package.

Example:
    >>> from dora_analysis.training import TrainConfig, prepare, train  # doctest: +SKIP
    >>> model = prepare(model, TrainConfig(method="dora", targets=("query", "value")))
"""

from .config import TrainConfig
from .inject import inject_adapters, merge_adapters, remove_adapters, unmerge_adapters
from .layers import DoRALinear, LoRALinear
from .loop import prepare, train

__all__ = ["DoRALinear", "LoRALinear", "TrainConfig", "inject_adapters", "merge_adapters",
           "prepare", "remove_adapters", "train", "unmerge_adapters"]
