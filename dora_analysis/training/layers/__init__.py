"""LoRA and DoRA layers, pure PyTorch, one module per kind of frozen layer; the maths is in
:mod:`.base`. Parameter names and shapes follow PEFT (``lora_A``, ``lora_B``,
``lora_embedding_A/B``, ``lora_magnitude_vector``) so adapter checkpoints load in PEFT unchanged.
"""

from __future__ import annotations

from torch import nn

from .base import DoRALayer, LoRALayer, lora_scaling
from .conv import DoRAConv, LoRAConv
from .embedding import DoRAEmbedding, LoRAEmbedding
from .linear import DoRAConv1D, DoRALinear, LoRAConv1D, LoRALinear

#: Which layer wraps which module, LoRA and DoRA: adding a layer type is one line here.
ADAPTER_LAYERS: tuple[tuple[type[LoRALayer], type[DoRALayer]], ...] = (
    (LoRALinear, DoRALinear),
    (LoRAConv1D, DoRAConv1D),
    (LoRAConv, DoRAConv),
    (LoRAEmbedding, DoRAEmbedding),
)

#: What the registry adapts, for messages.
ADAPTABLE = "nn.Linear, nn.Conv1d, nn.Conv2d, transformers Conv1D, nn.Embedding"


def adapter_classes(module: nn.Module) -> tuple[type[LoRALayer], type[DoRALayer]] | None:
    """The (LoRA, DoRA) layer classes that can wrap ``module``, or None."""
    for lora, dora in ADAPTER_LAYERS:
        if lora.accepts(module):
            return lora, dora
    return None


__all__ = ["ADAPTABLE", "ADAPTER_LAYERS", "DoRAConv", "DoRAConv1D", "DoRAEmbedding", "DoRALayer",
           "DoRALinear", "LoRAConv", "LoRAConv1D", "LoRAEmbedding", "LoRALayer", "LoRALinear",
           "adapter_classes", "lora_scaling"]
