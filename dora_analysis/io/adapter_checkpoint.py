"""What the readers hand out for a tuned adapter: its factors and the base they apply to, not merged
weights (the merge is above io: :func:`dora_analysis.pairs.merged`). Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapters import Adapter
    from .base import TensorSource


@dataclass
class AdapterCheckpoint:
    """An adapter opened against the base it is compared with: what the readers hand out for a
    tuned adapter (factors, not merged weights; :func:`dora_analysis.merged.merged` merges)."""

    adapter: Adapter
    base: TensorSource
    """BASE: ΔM and ΔD are measured against it."""
    trained_on: TensorSource | None = None
    """The base the adapter was trained against when it is not BASE (PiSSA's residual, LoftQ's
    quantized weights); the merge uses it and closes it."""

    def close(self) -> None:
        if self.trained_on is not None:
            self.trained_on.close()
