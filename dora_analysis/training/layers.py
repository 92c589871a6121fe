"""LoRA and DoRA linear layers (Hu et al., 2022; Liu et al., ICML 2024), pure PyTorch.

::

    LoRA (Eq. 1):  W' = W0 + s · B A                    s = alpha / r  (rsLoRA: alpha / sqrt(r))
    DoRA (Eq. 5):  W' = m · (W0 + s · B A) / ||W0 + s · B A||_c

    x ──► W0 ──────────────────────────────┐
    │                                       ├──► y        (W0 frozen; A: r × in, B: out × r)
    └─► dropout ─► A ─► B ─► · s ──────────┘

``||·||_c`` is the norm of each output channel (a row of the stored ``(out, in)`` weight); the
magnitude ``m`` starts at ``||W0||_c`` and B at zero, so training starts from W0 exactly. By
default the norm is detached from the gradient graph (paper §4.3, Eq. 11), which saves memory;
``detach_norm=False`` gives the full gradient of Eqs. 6-7. With dropout, the forward matches
PEFT's: the dropped-out input drives both the LoRA branch and the rescaling of the base output.

Parameter names follow PEFT (``lora_A``, ``lora_B``, ``lora_magnitude_vector``) so adapter
checkpoints load in PEFT unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``s · B A`` (Eq. 1)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.base_layer = base
        self.rank, self.alpha = rank, alpha
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` (out, in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: no inference overhead."""
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


class DoRALinear(LoRALinear):
    """DoRA (Eq. 5): a trainable magnitude per output channel, LoRA for the direction.

    ``magnitude_only=True`` trains only the magnitude (the direction stays W0's: paper Table 6).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, dropout: float = 0.0,
                 rslora: bool = False, detach_norm: bool = True,
                 magnitude_only: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout=dropout, rslora=rslora)
        self.detach_norm = detach_norm
        self.magnitude_only = magnitude_only
        with torch.no_grad():
            norm = torch.linalg.vector_norm(base.weight.float(), dim=1).to(base.weight.dtype)
        self.lora_magnitude_vector = nn.Parameter(norm)  # (out,) = ||W0||_c at start
        if magnitude_only:
            self.lora_A.weight.requires_grad_(False)
            self.lora_B.weight.requires_grad_(False)
        self._merged_norm: torch.Tensor | None = None

    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||_c`` per output channel; detached by default (§4.3), in which case
        no graph is built for it at all (the (out × in) sum is never saved for backward)."""
        if self.detach_norm:
            with torch.no_grad():
                return torch.linalg.vector_norm(self.base_layer.weight + self.delta_weight(), dim=1)
        return torch.linalg.vector_norm(self.base_layer.weight + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        scale = (self.lora_magnitude_vector / self.weight_norm()).view(1, -1)
        bias = self.base_layer.bias
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # y = m/||W0 + sBA|| ⊙ (W0 x + s B A x) + b: one activation-sized tensor is kept for
            # backward (the bracket) instead of two.
            core = result if bias is None else result - bias
            out = (core + self.lora_B(self.lora_A(x)) * self.scaling) * scale
            return out if bias is None else out + bias
        # With dropout (as PEFT): the dropped-out input drives the LoRA branch and the rescaling
        # of the base output; the undropped base output is kept as is.
        dropped = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(dropped)) * self.scaling
        return result + (scale - 1) * F.linear(dropped, self.base_layer.weight) + scale * lora

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._merged_norm = self.weight_norm().detach().clone()
            factor = (self.lora_magnitude_vector / self._merged_norm).view(-1, 1)
            merged = factor * (self.base_layer.weight + self.delta_weight())
            self.base_layer.weight.copy_(merged.to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            factor = (self.lora_magnitude_vector / self._merged_norm).view(-1, 1)
            original = self.base_layer.weight / factor - self.delta_weight()
            self.base_layer.weight.copy_(original.to(self.weight.dtype))
            self.merged, self._merged_norm = False, None
