"""LoRA/DoRA on ``nn.Conv1d`` and ``nn.Conv2d``, as PEFT builds them.

``lora_A`` is a convolution like the base one (same kernel, stride and padding) into ``r``
channels, ``lora_B`` a 1×1 convolution back to the output channels, so the update is
``B A`` with the kernel folded into A's inputs::

    W0: (out, in, k…)    A: (r, in, k…)    B: (out, r, 1…)
    ΔW = s · (B.view(out, r) @ A.view(r, in·k…)).view(out, in, k…)

DoRA keeps one magnitude per output channel (the norm over ``in`` and the kernel), stored as
PEFT does, ``(1, out, 1…)``. Grouped or dilated convolutions and padding modes other than zeros
are refused: PEFT's low-rank branch would not compute the merged weight's output for them.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import DoRALayer, LoRALayer


class LoRAConv(LoRALayer):
    """A frozen ``nn.Conv1d``/``nn.Conv2d`` plus ``s · B A`` (Eq. 1), output channels in dim 1."""

    channel_dim = 1

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d))

    def __init__(self, base: nn.Conv1d | nn.Conv2d, rank: int, alpha: float, **kwargs) -> None:
        unsupported = [
            f"{what}={value}" for what, value, plain in (
                ("groups", base.groups, 1), ("dilation", base.dilation, (1,) * len(base.dilation)),
                ("padding_mode", base.padding_mode, "zeros"))
            if value != plain
        ]
        if unsupported:
            raise ValueError(f"adapters on {type(base).__name__} need a plain convolution "
                             f"(got {', '.join(unsupported)})")
        super().__init__(base, rank, alpha, **kwargs)

    def _init_factors(self, rank: int, factory: dict) -> None:
        base = self.base_layer
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                           bias=False, **factory)
        self.lora_B = conv(rank, base.out_channels, ones, ones, bias=False, **factory)
        # PEFT's init: A as the layer's own default (Kaiming uniform), B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A.weight, self.lora_B.weight
        return a.reshape(self.rank, -1), b.reshape(b.shape[0], self.rank)  # (r, in·k…), (out, r)

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)  # (out, in·k…)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.weight.shape)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.weight, None)


class DoRAConv(DoRALayer, LoRAConv):
    """DoRA (Eq. 5) on a convolution: magnitude per output channel, stored ``(1, out, 1…)``."""

    def magnitude_shape(self, out: int) -> tuple[int, ...]:
        return (1, out) + (1,) * (self.weight.dim() - 2)
