"""LoRA/DoRA on ``nn.Embedding``, as PEFT builds them.

An embedding table ``W0`` is stored ``(num, dim)``: a lookup of one-hot inputs, i.e. the linear
map ``W0ᵀ`` ``(dim, num)`` whose outputs are the embedding dimensions. PEFT's factors follow that
reading, ``lora_embedding_A`` ``(r, num)`` and ``lora_embedding_B`` ``(dim, r)``, initialised the
other way round from linear layers (A zero, B normal), and DoRA keeps one magnitude per
embedding dimension (a stored column), ``(dim,)``::

    y = W0[x] + s · A.T[x] @ B.T          ΔW (stored layout) = s · (B A)ᵀ   (num, dim)

As in PEFT, no dropout is applied to embedding lookups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DoRALayer, LoRALayer


class LoRAEmbedding(LoRALayer):
    """A frozen ``nn.Embedding`` plus ``s · (B A)ᵀ`` (Eq. 1)."""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, *, dropout: float = 0.0,
                 **kwargs) -> None:
        super().__init__(base, rank, alpha, dropout=0.0, **kwargs)  # PEFT: no dropout here

    def _init_factors(self, rank: int, factory: dict) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, num, **factory))  # (r, num)
        self.lora_embedding_B = nn.Parameter(torch.randn(dim, rank, **factory))  # (dim, r)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # (dim, num)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self._lookup(x, self.lora_embedding_A.T) @ self.lora_embedding_B.T  # (…, dim)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self._lookup(x, self.weight)


class DoRAEmbedding(DoRALayer, LoRAEmbedding):
    """DoRA (Eq. 5) on an embedding: magnitude ``(dim,)``, one per embedding dimension."""
