"""An adapter seen as the tuned checkpoint it stands for: the base merged with it as it is read
(:mod:`dora_analysis.lowrank`: Eq. 1, Eq. 5, the closed form), from the factors the io readers
hand out (:class:`~dora_analysis.io.adapter_checkpoint.AdapterCheckpoint`); opened through
:func:`dora_analysis.pairs.open_tuned`.
"""

from __future__ import annotations

import threading

import torch

from .errors import TensorMismatchError
from .io.adapters import Adapter, config_heads
from .io.base import TensorInfo, TensorSource
from .io.dtypes import name_of
from .io.factors import LowRankUpdate
from .io.targets import resolve_targets
from .lowrank import (
    F64,
    ChannelSums,
    closed_form_sums,
    kasa_update,
    magnitude_on_stored_rows,
    merged_rows,
    rows_per_block,
    safe_ratio,
)


def _stored_rows(base: TensorSource, name: str, start: int, stop: int) -> torch.Tensor:
    rows = base.get_rows(name, start, stop)
    return rows.reshape(rows.shape[0], -1).to(F64)  # (out, in * prod(k)), as Eqs. 2-4 see it


class AdapterSource(TensorSource):
    """The tuned checkpoint an adapter stands for, merged with its base as it is read."""

    partial = True  # an adapter holds only what it changes

    def __init__(self, adapter: Adapter, base: TensorSource, *,
                 trained_on: TensorSource | None = None):
        """``trained_on``: the base the adapter was trained against when it is not ``base``
        (PiSSA's residual, LoftQ's quantized weights); the merge uses it, this source owns and
        closes it, and ΔW against ``base`` is no longer ``s·B·A`` (no closed form)."""
        self.path = adapter.path
        self.method = adapter.method
        self._own_base = trained_on is not None
        self.base = base = trained_on if trained_on is not None else base
        self._base_infos = {n: i for n, i in base.infos().items() if i.is_matrix}
        # base name -> (update, stored transposed?)
        self.targets = resolve_targets(adapter, self._base_infos,
                                       heads=lambda: config_heads(base.path))
        self._full = dict(adapter.full_weights)
        self._factor_cache: tuple[str, torch.Tensor] | None = None
        self._resolved: dict[str, LowRankUpdate] = {}  # KaSA: the update against this base
        self._lock = threading.Lock()
        self.notes = tuple(adapter.notes)
        self.thread_safe = base.thread_safe  # merging keeps no state between reads

    def _target(self, name: str) -> tuple[LowRankUpdate, bool]:
        """``(update, transposed)`` of an adapted weight, resolved against the base where the
        update depends on it (KaSA's truncation: one SVD of the base weight, once)."""
        update, transposed = self.targets[name]
        if not update.truncate_base:
            return update, transposed
        with self._lock:
            if name not in self._resolved:
                w0 = self.base.get_tensor(name)
                w0 = w0.reshape(w0.shape[0], -1).to(F64)
                self._resolved[name] = kasa_update(update, w0)
            return self._resolved[name], transposed

    def keys(self) -> list[str]:
        return [*self.targets, *self._full]

    def info(self, name: str) -> TensorInfo:
        if name in self.targets:
            return TensorInfo(self._base_infos[name].shape, name_of(self.targets[name][0].dtype))
        t = self._full[name]
        return TensorInfo(tuple(t.shape), name_of(t.dtype))

    def get_tensor(self, name: str) -> torch.Tensor:
        if name in self.targets:
            shape = self._base_infos[name].shape
            return self.get_rows(name, 0, shape[0]).reshape(shape)
        return self._full[name]

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        if name not in self.targets:
            return self._full[name][expert, start:stop]
        update, transposed = self._target(name)
        rows = self.base.get_expert_rows(name, expert, start, stop).to(F64)  # (stop-start, cols)
        if not update.experts:
            raise TensorMismatchError(f"{self.path}: '{name}' is a 3-D tensor but its adapter "
                                      "holds no per-expert factors")
        a, b = update.expert_factors(expert)  # (r, in), (out, r)
        if transposed:  # stored (in, out): rows are input features
            return rows + update.scale * (a[:, start:stop].T @ b.T)
        return rows + update.scale * (b[start:stop] @ a)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self.targets:
            return self._full[name][start:stop]
        if self.targets[name][0].experts:  # whole experts, one after the other
            rows = self._base_infos[name].shape[1]
            return torch.stack([self.get_expert_rows(name, e, 0, rows)
                                for e in range(start, min(stop, self._base_infos[name].shape[0]))])
        update, transposed = self._target(name)
        rows = _stored_rows(self.base, name, start, stop)
        factor = None
        if update.magnitude is not None and not magnitude_on_stored_rows(update, transposed):
            factor = self.column_factor(name)
        return merged_rows(update, rows, start, stop, transposed, factor)

    def close(self) -> None:
        self.targets, self._full, self._factor_cache = {}, {}, None  # the adapter's tensors
        self._resolved = {}
        if self._own_base:
            self.base.close()

    def will_read(self, names) -> None:
        if self._own_base:  # the shared BASE gets its own hint from the analysis
            self.base.will_read(names)

    def transposed(self, name: str) -> bool | None:
        """Orientation of an adapted weight as the adapter knows it; None for other weights."""
        return self.targets[name][1] if name in self.targets else None

    def low_rank(self, name: str) -> LowRankUpdate | None:
        """The update of ``name`` when it is exactly ``s·B·A`` (LoRA, no DoRA magnitude)."""
        if name not in self.targets or self._own_base:
            return None
        update = self._target(name)[0]
        return update if update.exact_low_rank else None

    def adapter_update(self, name: str) -> LowRankUpdate | None:
        """The update of ``name`` as the adapter stores it (LoRA or DoRA), or None."""
        return self.targets[name][0] if name in self.targets else None

    def column_factor(self, name: str) -> torch.Tensor:
        """``m / ||merged column||`` for DoRA normalised along stored columns (one extra pass)."""
        cached = self._factor_cache  # read once: worker threads may replace it meanwhile
        if cached is None or cached[0] != name:
            update, transposed = self._target(name)
            rows, cols = self._base_infos[name].matrix_shape
            sums = None
            step = rows_per_block(cols)
            plain = LowRankUpdate(update.lora_a, update.lora_b, update.scale)
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                block = merged_rows(plain, _stored_rows(self.base, name, start, stop), start,
                                    stop, transposed)
                part = block.square().sum(0)
                sums = part if sums is None else sums + part
            cached = self._factor_cache = (name, safe_ratio(update.magnitude, sums.sqrt()))
        return cached[1]

    def closed_form(self, name: str, block_elements: int) -> ChannelSums | None:
        """Axis-``out`` sums in closed form, or None where it does not apply (full weights,
        magnitude per input feature)."""
        if name not in self.targets or self._own_base:
            return None
        update, transposed = self._target(name)
        if update.magnitude is not None and update.magnitude_axis != "out" \
                or update.token_rows is not None:
            return None
        base = self.base
        return closed_form_sums(update, lambda a, b: _stored_rows(base, name, a, b),
                                self._base_infos[name].matrix_shape, transposed, block_elements)
