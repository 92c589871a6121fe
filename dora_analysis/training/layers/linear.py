"""LoRA/DoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (GPT-2 family).

``Conv1D`` computes ``x @ W + b`` with ``W`` stored ``(in, out)``: the transpose of a linear
weight. PEFT adapts it with ``fan_in_fan_out=True``: the same ``lora_A`` ``(r, in)`` and
``lora_B`` ``(out, r)`` as for a linear layer, the update transposed when merged, and one DoRA
magnitude per output channel (a stored column).

::

    x ──► W0 ──────────────────────────────┐
    │                                       ├──► y        (W0 frozen; A: r × in, B: out × r)
    └─► dropout ─► A ─► B ─► · s ──────────┘
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import DoRALayer, LoRALayer


class LoRALinear(LoRALayer):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``s · B A`` (Eq. 1)."""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def in_out(self) -> tuple[int, int]:
        return self.base_layer.in_features, self.base_layer.out_features

    def _init_factors(self, rank: int, factory: dict) -> None:
        fan_in, fan_out = self.in_out()
        self.lora_A = nn.Linear(fan_in, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, fan_out, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT
        nn.init.zeros_(self.lora_B.weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DoRALinear(DoRALayer, LoRALinear):
    """DoRA (Eq. 5) on an ``nn.Linear``: magnitude ``(out,)``."""


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (found by name: transformers is not needed to train)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


class LoRAConv1D(LoRALinear):
    """LoRA on transformers' ``Conv1D`` (weight ``(in, out)``; PEFT ``fan_in_fan_out=True``)."""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return is_transformers_conv1d(module)

    def in_out(self) -> tuple[int, int]:
        fan_in, fan_out = self.base_layer.weight.shape  # stored (in, out)
        return fan_in, fan_out

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class DoRAConv1D(DoRALayer, LoRAConv1D):
    """DoRA (Eq. 5) on transformers' ``Conv1D``: magnitude ``(out,)``, one per stored column."""
