"""An adapter's factors for one weight: ``ΔW = scale · B @ A`` (PEFT orientation) and DoRA's
magnitude — what the adapter readers hand out; the merge and the closed-form sums are computed
from them above io."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..columns import Axis

F64 = torch.float64


@dataclass
class LowRankUpdate:
    """``ΔW = scale · B @ A`` for one weight (PEFT orientation), plus DoRA's magnitude if any."""

    lora_a: torch.Tensor | None
    """(r, in_flat), as stored (kept small: float64 only while one weight is merged); None for a
    magnitude-only module."""
    lora_b: torch.Tensor | None
    """(out, r), as stored."""
    scale: float
    magnitude: torch.Tensor | None = None
    """DoRA magnitude, float64, one entry per vector along ``magnitude_axis``."""
    magnitude_axis: Axis = "out"
    stored_in_out: bool = False
    """The base weight is stored ``(in, out)`` (embeddings; ``Conv1D`` in a live model)."""
    fan_in_fan_out: bool = False
    """PEFT's ``fan_in_fan_out``: stored ``(in, out)`` where the factors fit that way round."""
    dtype: torch.dtype = torch.float32
    """Stored dtype of the adapter tensors."""
    experts: int = 0
    """PEFT ``target_parameters`` on a 3-D MoE tensor: the number of experts whose factors are
    stacked in ``lora_a`` ``(r·E, in)`` and ``lora_b`` ``(out, r·E)``; 0 for an ordinary weight."""
    truncate_base: int = 0
    """KaSA: the base's smallest singular components dropped before the update is added
    (``W' = W0 − U_d S_d V_dᵀ + s·B·A``, ``d`` = this many); resolved against the base by
    :func:`~dora_analysis.lowrank.kasa_update`."""
    token_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    """PEFT ``trainable_token_indices``: ``(ids, rows)`` — stored rows ``ids`` of the weight are
    replaced by ``rows`` ``(len(ids), cols)``."""

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    @property
    def exact_low_rank(self) -> bool:
        """Whether ΔW against the base is ``scale · B @ A`` alone (no magnitude, no base
        truncation, no replaced rows)."""
        return (self.magnitude is None and self.rank > 0 and not self.experts
                and not self.truncate_base and self.token_rows is None)

    def expert_factors(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_e, B_e)`` of one expert, float64, ``(r, in)`` and ``(out, r)``.

        PEFT's ``ParamWrapper`` stacks A expert-major (``A.view(E, r, in)``) but B expert-minor
        (``B.view(out, r, E)``); ``ΔW_e = s · B_e @ A_e``.
        """
        a, b = self.factors()
        e = self.experts
        return a.reshape(e, -1, a.shape[-1])[expert], b.reshape(b.shape[0], -1, e)[:, :, expert]

    def shape(self) -> tuple[int, int] | None:
        """``(out, in_flat)`` implied by the adapter, or None when only a magnitude is stored."""
        if self.lora_a is None or self.lora_b is None:
            return None
        return self.lora_b.shape[0], self.lora_a.shape[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` in float64."""
        return self.lora_a.to(F64), self.lora_b.to(F64)


def flipped(update: LowRankUpdate) -> LowRankUpdate:
    """The same ΔW for the other orientation of its stored tensor (a tied ``lm_head`` seen as
    the embedding it shares): ``(s·B·A)ᵀ = s·Aᵀ·Bᵀ``, the magnitude along the other axis."""
    a, b = update.lora_a, update.lora_b
    return dataclasses.replace(
        update, lora_a=None if b is None else b.T, lora_b=None if a is None else a.T,
        magnitude_axis="in" if update.magnitude_axis == "out" else "out",
        stored_in_out=not update.stored_in_out, fan_in_fan_out=False)
