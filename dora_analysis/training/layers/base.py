"""What every LoRA/DoRA layer shares, whatever the frozen layer it wraps (Hu et al., 2022; Liu et
al., ICML 2024).

::

    LoRA (Eq. 1):  W' = W0 + s · B A                    s = alpha / r  (rsLoRA: alpha / sqrt(r))
    DoRA (Eq. 5):  W' = m · (W0 + s · B A) / ||W0 + s · B A||_c

Every wrapped layer is read as one ``(out, in)`` matrix: an ``nn.Linear`` weight as stored, a
transformers ``Conv1D`` (stored ``(in, out)``) transposed, a convolution with its kernel folded
into the inputs (``(out, in · k…)``), an embedding table (stored ``(num, dim)``) transposed, as
a lookup of one-hot inputs whose outputs are the embedding dimensions. ``||·||_c`` is the norm of
each row of that matrix, one per output channel; these are PEFT's conventions, so adapters saved
from these layers load in PEFT with the same outputs. A subclass says how its base weight reads
as that matrix and runs the low-rank branch on inputs; the maths of Eqs. 1 and 5 lives here once.

The magnitude ``m`` starts at ``||W0||_c`` and B at zero (embeddings: A at zero), so training
starts from W0 exactly. By default the norm is detached from the gradient graph (paper §4.3,
Eq. 11); ``detach_norm=False`` gives the full gradient of Eqs. 6-7.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALayer(nn.Module):
    """A frozen layer plus a trainable low-rank update ``s · B A`` (Eq. 1).

    Subclasses create the factors in ``_init_factors`` (PEFT's names and initialisation) and
    define ``factors``, ``as_matrix``/``from_matrix``, ``lora_branch`` and ``base_without_bias``.
    """

    #: Dimension of the layer's output that holds the output channels.
    channel_dim: int = -1

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.base_layer = base
        self.rank, self.alpha = rank, alpha
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_factors(rank, {"device": base.weight.device, "dtype": base.weight.dtype})
        self.merged = False
        for param in base.parameters():
            param.requires_grad_(False)

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether this class can wrap ``module``."""
        raise NotImplementedError

    # -- what a subclass defines -----------------------------------------------------------------
    def _init_factors(self, rank: int, factory: dict) -> None:
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` as ``(r, in)`` and ``B`` as ``(out, r)`` matrices."""
        raise NotImplementedError

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the base layer's layout → the ``(out, in)`` matrix."""
        return weight

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """The ``(out, in)`` matrix → the base layer's layout."""
        return matrix

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` (unscaled), shaped like the base layer's output."""
        raise NotImplementedError

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x`` without the bias, shaped like the base layer's output."""
        raise NotImplementedError

    # -- Eq. 1 -------------------------------------------------------------------------------------
    def factor_parameters(self) -> list[nn.Parameter]:
        """The trainable low-rank factors (``lora_A``/``lora_B`` or ``lora_embedding_A/B``)."""
        return [p for name, p in self.named_parameters()
                if name.startswith(("lora_A", "lora_B", "lora_embedding_"))]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta_matrix(self) -> torch.Tensor:
        """``s · B A`` as the ``(out, in)`` matrix."""
        a, b = self.factors()  # (r, in), (out, r)
        return self.scaling * (b @ a)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in the base layer's layout."""
        return self.from_matrix(self.delta_matrix())

    def channel_view(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-channel vector shaped to broadcast over an output of ``ndim`` dimensions."""
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return vector.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_branch(self.lora_dropout(x)) * self.scaling

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


class DoRALayer(LoRALayer):
    """DoRA (Eq. 5): a trainable magnitude per output channel, LoRA for the direction.

    ``magnitude_only=True`` trains only the magnitude (the direction stays W0's: paper Table 6).
    The magnitude is stored in PEFT's shape for the layer type (``magnitude_shape``).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0,
                 rslora: bool = False, detach_norm: bool = True,
                 magnitude_only: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout=dropout, rslora=rslora)
        self.detach_norm = detach_norm
        self.magnitude_only = magnitude_only
        with torch.no_grad():
            norm = torch.linalg.vector_norm(self.as_matrix(base.weight).float(), dim=1)  # (out,)
        self.lora_magnitude_vector = nn.Parameter(
            norm.reshape(self.magnitude_shape(norm.numel())).to(base.weight.dtype))
        if magnitude_only:
            for param in self.factor_parameters():
                param.requires_grad_(False)
        self._merged_norm: torch.Tensor | None = None

    def magnitude_shape(self, out: int) -> tuple[int, ...]:
        """How PEFT stores the magnitude of this layer type."""
        return (out,)

    def magnitude(self) -> torch.Tensor:
        """``m``, one per output channel: ``(out,)``."""
        return self.lora_magnitude_vector.reshape(-1)

    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||_c`` per output channel ``(out,)``; detached by default (§4.3), in
        which case no graph is built for it at all (the (out × in) sum is never saved for
        backward)."""
        if self.detach_norm:
            with torch.no_grad():
                return self._norm()
        return self._norm()

    def _norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.as_matrix(self.weight) + self.delta_matrix(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        scale = self.channel_view(self.magnitude() / self.weight_norm(), result.dim())
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # y = m/||W0 + sBA|| ⊙ (W0 x + s B A x) + b: one activation-sized tensor is kept for
            # backward (the bracket) instead of two.
            bias = None if bias is None else self.channel_view(bias, result.dim())
            core = result if bias is None else result - bias
            out = (core + self.lora_branch(x) * self.scaling) * scale
            return out if bias is None else out + bias
        # With dropout (as PEFT): the dropped-out input drives the LoRA branch and the rescaling
        # of the base output; the undropped base output is kept as is.
        dropped = self.lora_dropout(x)
        lora = self.lora_branch(dropped) * self.scaling
        return result + (scale - 1) * self.base_without_bias(dropped) + scale * lora

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._merged_norm = self.weight_norm().detach().clone()
            factor = (self.magnitude() / self._merged_norm).view(-1, 1)  # (out, 1)
            merged = factor * (self.as_matrix(self.weight) + self.delta_matrix())
            self.base_layer.weight.copy_(self.from_matrix(merged).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            factor = (self.magnitude() / self._merged_norm).view(-1, 1)
            original = self.as_matrix(self.weight) / factor - self.delta_matrix()
            self.base_layer.weight.copy_(self.from_matrix(original).to(self.weight.dtype))
            self.merged, self._merged_norm = False, None
