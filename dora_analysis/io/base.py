"""The interface every checkpoint reader implements: a lazy, read-only view of named tensors.

A reader answers ``keys()`` and ``get_tensor(name)``; ``info``, ``get_rows`` and ``read_rows``
have cheap overrides where the format allows (safetensors reads only the bytes asked for, as
numpy arrays, without torch). Everything else a caller may ask of a source is declared here with
its default, so the analysis never probes a reader with ``getattr``: adapters override
``method``, ``partial``, ``transposed``, ``closed_form``, ``low_rank`` and ``adapter_update``;
remote readers take the ``will_read`` hint and report ``bytes_read``.

Readers that import torch do so where they need it: planning (``keys``, ``info``) and the rows
of safetensors files, local or remote, never load it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .dtypes import ANALYSABLE, name_of

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .adapters import LowRankUpdate

#: Per-output-channel ``(|w0|², |wt|², |wt − w0|²)``, float64 arrays (an adapter's closed form).
ChannelSums = tuple["np.ndarray", "np.ndarray", "np.ndarray"]


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: str
    """torch's name of the stored type (``"bfloat16"``; see :mod:`dora_analysis.io.dtypes`), or
    the format's own code for types torch does not hold (``"F8_E8M0"``)."""
    alias_of: str | None = None
    """The stored tensor this name shares (a tied ``lm_head`` of a base: its input embedding);
    an alias no other checkpoint has is not reported as missing."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the 2-D view ``(out, in * prod(k))``."""
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def is_matrix(self) -> bool:
        """A floating weight with at least 2 dimensions: what Eqs. 2-4 apply to."""
        return self.dtype in ANALYSABLE and len(self.shape) >= 2 and 0 not in self.shape


class TensorSource(ABC):
    """A read-only, lazy view of one checkpoint's tensors."""

    path: Path
    #: The fine-tuning method the checkpoint reveals (adapters: ``lora``/``dora``).
    method: str = "unknown"
    #: True when the source holds only what changed (an adapter): base tensors it lacks are
    #: unchanged, not missing.
    partial: bool = False
    #: True when several threads may read the source at once (it keeps no state between reads
    #: that another thread's read could disturb). The analysis's workers share such a source;
    #: the reads of any other take turns (see :mod:`dora_analysis.executors`).
    thread_safe: bool = False
    #: What the reader noticed that changes how the numbers read (an adapter's config that
    #: disagrees with its weights …): warned once per run, by the plan that opens every source.
    notes: tuple[str, ...] = ()

    @abstractmethod
    def keys(self) -> list[str]:
        """All tensor names, in stored order."""

    @abstractmethod
    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, as stored (no dtype conversion)."""

    def info(self, name: str) -> TensorInfo:
        t = self.get_tensor(name)
        return TensorInfo(tuple(t.shape), name_of(t.dtype))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the stored tensor (first dimension)."""
        return self.get_tensor(name)[start:stop]

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of expert ``expert`` of a 3-D MoE tensor ``(E, out, in)``.

        The default reads the whole expert; readers that can address rows directly override it.
        """
        return self.get_rows(name, expert, expert + 1)[0, start:stop]

    def read_rows(self, name: str, start: int, stop: int, *, expert: int | None = None,
                  buffer: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        """Rows ``start:stop`` (of expert ``expert`` of a 3-D MoE tensor, if given) for the
        kernel: a numpy array of the stored elements (bfloat16 as its bits, ``uint16``) where
        the reader can, else a torch tensor of the stored dtype.

        A memory-mapped reader returns a view of the mapping (no copy; ``buffer`` unused); a
        reader that copies fills ``buffer`` (a reused ``uint8`` array, grown by the caller to
        the rows' size) where it can. Either way the rows are valid until the buffer is reused
        or the source closed. The default reads torch tensors through :meth:`get_rows`.
        """
        if expert is not None:
            return self.get_expert_rows(name, expert, start, stop)
        return self.get_rows(name, start, stop)

    def mapped(self, name: str) -> bool:
        """Whether :meth:`read_rows` hands out views of a memory mapping for ``name`` (no copy,
        so whole row ranges are read at once rather than buffer by buffer)."""
        return False

    def infos(self) -> dict[str, TensorInfo]:
        """Shape and dtype of every tensor, in stored order (computed once)."""
        cached = self.__dict__.get("_infos_cache")
        if cached is None:
            cached = self.__dict__["_infos_cache"] = {n: self.info(n) for n in self.keys()}
        return cached

    def transposed(self, name: str) -> bool | None:
        """Whether the output channels of ``name`` are its stored columns, if the source knows
        (adapters do, from ``fan_in_fan_out``); None leaves it to the parameter name."""
        return None

    def closed_form(self, name: str, block_elements: int) -> ChannelSums | None:
        """Per-output-channel sums without materialising the weight (adapters), or None."""
        return None

    def low_rank(self, name: str) -> LowRankUpdate | None:
        """The low-rank update that makes ``name`` from the base (LoRA adapters), or None."""
        return None

    def adapter_update(self, name: str) -> LowRankUpdate | None:
        """The adapter's update of ``name`` as stored (LoRA or DoRA, magnitude included), or
        None for a full checkpoint or a weight the adapter leaves alone (health checks)."""
        return None

    def will_read(self, names: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Hint: these tensors are read next (remote readers coalesce their byte ranges)."""

    @property
    def bytes_read(self) -> int | None:
        """Bytes fetched so far where the reader counts them (remote storage), else None."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reason(exc: BaseException) -> str:
    """A short, one-line-friendly description of an exception for an ``error:`` message."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "…"
