"""An adapter seen as the tuned checkpoint it stands for: the base merged with it, row block by row
block (Eqs. 1 and 5), plus the closed form of the per-channel sums that needs no ``B @ A`` at all.

Closed form (axis ``out``; ``u_n = W0[n]``, ``d_n = s · B[n] @ A`` in PEFT orientation)::

    |d_n|²    = s² · rowsum((B @ (A Aᵀ)) ⊙ B)[n]
    u_n · d_n = s  · rowsum((W0 Aᵀ) ⊙ B)[n]
    LoRA:  |wt|² = |u|² + 2 u·d + |d|²,   |wt − u|² = |d|²
    DoRA:  |wt|² = m²,  |wt − u|² = m² − 2 m (|u|² + u·d) / |u + d| + |u|²

so one read of each base tensor (``W0 Aᵀ``, accumulated block by block) gives Eqs. 3-4 exactly,
in float64, at the cost of an (out × r) product instead of an (out × in) one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import torch

from ..errors import CheckpointFormatError, TensorMismatchError, listing
from ..hardware import DEFAULT_BLOCK_ELEMENTS
from .adapters import Adapter, LowRankUpdate, config_heads, kohya_flat, strip_kohya_prefix
from .base import ChannelSums, TensorInfo, TensorSource
from .dtypes import name_of
from .keys import align_names, module_path, stored_in_out, strip_wrappers
from .tied import OUTPUT_HEAD

F64 = torch.float64


def _stored_rows(base: TensorSource, name: str, start: int, stop: int) -> torch.Tensor:
    rows = base.get_rows(name, start, stop)
    return rows.reshape(rows.shape[0], -1).to(F64)  # (out, in * prod(k)), as Eqs. 2-4 see it


def _rows_per_block(cols: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    return max(1, block_elements // max(1, cols))


def merged_rows(
    update: LowRankUpdate, rows: torch.Tensor, start: int, stop: int, transposed: bool,
    column_factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stored rows ``start:stop`` of the merged weight (Eq. 1, then Eq. 5's normalisation).

    ``rows`` are the base's stored rows in float64 (2-D). ``column_factor`` is ``m / ||column||``
    when DoRA normalises along the stored columns (see :meth:`AdapterSource.column_factor`).
    """
    if update.lora_a is not None:
        if transposed:  # stored (in, out): rows are input features
            a_rows = update.lora_a[:, start:stop].to(F64)
            rows = rows + update.scale * (a_rows.T @ update.lora_b.to(F64).T)
        else:
            b_rows = update.lora_b[start:stop].to(F64)
            rows = rows + update.scale * (b_rows @ update.lora_a.to(F64))
    if update.magnitude is not None:
        if _magnitude_on_stored_rows(update, transposed):
            norms = torch.linalg.vector_norm(rows, dim=1)
            rows = rows * _safe_ratio(update.magnitude[start:stop], norms)[:, None]
        else:
            rows = rows * column_factor[None, :]
    if update.token_rows is not None:  # trainable tokens: stored rows replaced (index_copy)
        ids, values = update.token_rows
        inside = (ids >= start) & (ids < stop)
        if bool(inside.any()):
            rows = rows.clone()
            rows[ids[inside] - start] = values[inside].to(F64).reshape(int(inside.sum()), -1)
    return rows


def kasa_update(update: LowRankUpdate, w0: torch.Tensor) -> LowRankUpdate:
    """KaSA's update as one low-rank update of the untouched base ``w0`` (out, in), float64.

    PEFT's ``KasaLinearVariant`` replaces the base by its SVD truncated to ``k − d`` components
    (``k = min(out, in)``, ``d`` = :attr:`~LowRankUpdate.truncate_base`), then adds
    ``s · B @ diag(lora_diag) @ A``; so ``W' − W0 = s · [B·diag | −U_d S_d / s] @ [A ; V_dᵀ]``, a
    rank ``r + d`` update (the diagonal is already in ``lora_b``).
    """
    k, d = min(w0.shape), update.truncate_base
    if d >= k:
        raise CheckpointFormatError(f"KaSA needs r = {d} below min(out, in) = {k}: the adapter "
                                    "does not fit this base")
    u, sv, vh = torch.linalg.svd(w0, full_matrices=False)  # (out, k), (k,), (k, in)
    a = torch.cat([update.lora_a.to(F64), vh[k - d:]])  # (r + d, in)
    b = torch.cat([update.lora_b.to(F64), -(u[:, k - d:] * sv[k - d:]) / update.scale], dim=1)
    return dataclasses.replace(update, lora_a=a, lora_b=b, truncate_base=0)


def flipped(update: LowRankUpdate) -> LowRankUpdate:
    """The same ΔW for the other orientation of its stored tensor (a tied ``lm_head`` seen as
    the embedding it shares): ``(s·B·A)ᵀ = s·Aᵀ·Bᵀ``, the magnitude along the other axis."""
    a, b = update.lora_a, update.lora_b
    return dataclasses.replace(
        update, lora_a=None if b is None else b.T, lora_b=None if a is None else a.T,
        magnitude_axis="in" if update.magnitude_axis == "out" else "out",
        stored_in_out=not update.stored_in_out, fan_in_fan_out=False)


def _magnitude_on_stored_rows(update: LowRankUpdate, transposed: bool) -> bool:
    return (update.magnitude_axis == "out") != transposed


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # A zero-norm vector has no direction to rescale; PEFT would produce NaN, we keep it at zero.
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def closed_form_sums(
    update: LowRankUpdate, base: TensorSource, name: str, info: TensorInfo, transposed: bool,
    block_elements: int,
) -> ChannelSums:
    """Per-output-channel ``|w0|², |wt|², |wt − w0|²`` of the merged weight, without B @ A
    (float64 numpy arrays)."""
    rows, cols = info.matrix_shape
    out = cols if transposed else rows
    r, s = update.rank, update.scale
    a, b = update.factors() if r else (None, None)
    sq0 = torch.zeros(out, dtype=F64)
    w0_at = torch.zeros(out, r, dtype=F64)  # W0 @ Aᵀ in PEFT orientation, (out, r)
    step = _rows_per_block(cols, block_elements)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        x = _stored_rows(base, name, start, stop)  # (stop - start, cols)
        if transposed:
            sq0 += x.square().sum(0)
            if r:
                w0_at += (a[:, start:stop] @ x).T
        else:
            sq0[start:stop] = torch.linalg.vector_norm(x, dim=1).square()
            if r:
                w0_at[start:stop] = x @ a.T
    if r:
        ud = s * (w0_at * b).sum(1)
        dd = s * s * ((b @ (a @ a.T)) * b).sum(1)
    else:
        ud = dd = torch.zeros(out, dtype=F64)
    if update.magnitude is None:
        return sq0.numpy(), (sq0 + 2 * ud + dd).numpy(), dd.numpy()
    m = update.magnitude
    norm_merged = (sq0 + 2 * ud + dd).clamp(min=0).sqrt()  # |u + d|
    sqd = m.square() - 2 * m * _safe_ratio(sq0 + ud, norm_merged) + sq0
    return sq0.numpy(), m.square().numpy(), sqd.clamp(min=0).numpy()


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
        if update.magnitude is not None and not _magnitude_on_stored_rows(update, transposed):
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
            step = _rows_per_block(cols)
            plain = LowRankUpdate(update.lora_a, update.lora_b, update.scale)
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                block = merged_rows(plain, _stored_rows(self.base, name, start, stop), start,
                                    stop, transposed)
                part = block.square().sum(0)
                sums = part if sums is None else sums + part
            cached = self._factor_cache = (name, _safe_ratio(update.magnitude, sums.sqrt()))
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
        return closed_form_sums(update, self.base, name, self._base_infos[name], transposed,
                                block_elements)


def _peft_shape(info: TensorInfo, transposed: bool) -> tuple[int, int]:
    rows, cols = info.matrix_shape
    return (cols, rows) if transposed else (rows, cols)


_WRAPPER = ".base_layer"


def _fits(update: LowRankUpdate, shape: tuple[int, ...]) -> tuple[int, bool] | None:
    """``(experts, stored (in, out)?)`` if the stacked factors fit a parameter of this shape."""
    if update.lora_a is None or update.lora_b is None:
        return None
    (rows, n_in), n_out = update.lora_a.shape, update.lora_b.shape[0]
    experts, inner = (shape[0], shape[1:]) if len(shape) == 3 else (1, shape)
    if len(inner) != 2 or rows % experts:
        return None
    if inner == (n_out, n_in):
        return experts, False
    if inner == (n_in, n_out):
        return experts, True
    return None


def parameter_targets(adapter: Adapter, base_infos: dict[str, TensorInfo]
                      ) -> dict[str, tuple[LowRankUpdate, bool]]:
    """Base tensor → (update, stored transposed?) for PEFT ``target_parameters`` adapters.

    PEFT wraps each targeted parameter (``mlp.experts.gate_up_proj``) in a ``ParamWrapper``;
    several on one module nest, so adapter keys name the owner plus one ``.base_layer`` per level
    (``experts.base_layer.lora_A``), never the parameter. The parameter is the one the factor
    shapes fit — ``A`` ``(r·E, in)``, ``B`` ``(out, r·E)`` against ``(E, out, in)`` (or GPT-OSS's
    ``(E, in, out)``); where several fit, wrappers nest in the module's parameter order, innermost
    first, which is the order of the base file.
    """
    if not adapter.target_parameters:
        return {}
    by_owner: dict[str, list[str]] = {}
    for module in adapter.updates:
        owner = module
        while owner.endswith(_WRAPPER):
            owner = owner[: -len(_WRAPPER)]
        by_owner.setdefault(strip_wrappers(owner), []).append(module)
    targets = {}
    for owner, modules in by_owner.items():
        params = [n for n in base_infos if strip_wrappers(n).rpartition(".")[0] == owner
                  and any(n == t or n.endswith("." + t) for t in adapter.target_parameters)]
        for module in sorted(modules, key=lambda m: -m.count(_WRAPPER)):  # innermost first
            update = adapter.updates[module]
            for name in params:
                fit = _fits(update, base_infos[name].shape)
                if name not in targets and fit is not None:
                    experts, transposed = fit
                    update.experts = experts if len(base_infos[name].shape) == 3 else 0
                    targets[name] = (update, transposed)
                    break
    return targets


_TIED_HINT = (" (if BASE ties lm_head to its input embedding, keep BASE's config.json beside it: "
              "PEFT merges such a LoRA into the shared embedding)")


def _transposed(update: LowRankUpdate, base_name: str, info: TensorInfo) -> bool:
    """Whether the weight is stored ``(in, out)``: embeddings and ``Conv1D`` always (as PEFT,
    whatever ``fan_in_fan_out`` says); elsewhere ``fan_in_fan_out`` where the factors fit the
    transposed weight (PEFT forces it off for ``nn.Linear``)."""
    if update.stored_in_out or stored_in_out(base_name):
        return True
    if not update.fan_in_fan_out:
        return False
    rows, cols = info.matrix_shape
    return update.shape() != (rows, cols) or rows == cols


def _misfit(module: str, update: LowRankUpdate, base_name: str, info: TensorInfo,
            transposed: bool) -> str | None:
    """Why ``update`` cannot apply to base weight ``base_name``, or None."""
    expected = _peft_shape(info, transposed)
    got = update.shape()
    n_mag = expected[0] if update.magnitude_axis == "out" else expected[1]
    if got is not None and got != expected:
        return f"'{module}': adapter {list(got)} vs base {base_name} {list(expected)}"
    if update.magnitude is not None and update.magnitude.numel() != n_mag:
        return (f"'{module}': magnitude of {update.magnitude.numel()} vs base {base_name} with "
                f"{n_mag} vectors")
    if update.truncate_base and (transposed or len(info.shape) != 2):
        return f"'{module}': KaSA adapts linear weights only, not {base_name} {list(info.shape)}"
    if update.token_rows is not None:
        ids, rows = update.token_rows
        n_rows, n_cols = info.matrix_shape
        if rows.shape[1] != n_cols or bool(((ids < 0) | (ids >= n_rows)).any()):
            return (f"'{module}': trainable token rows {list(rows.shape)} for ids "
                    f"{int(ids.min())}…{int(ids.max())} do not fit {base_name} "
                    f"{list(info.shape)}")
    return None


def _share_tied(targets: dict[str, tuple[LowRankUpdate, bool]], base_infos: dict[str, TensorInfo],
                adapter: Adapter) -> list[str]:
    """Add, for each adapted weight that shares its tensor with another base name (a tied
    ``lm_head`` and its embedding), the same change under that name, seen in its orientation:
    merged into the shared tensor, both change (PEFT's ``merge_and_unload``). A name with a saved
    copy of its own (``modules_to_save``) keeps it. Returns the weights adapted twice."""
    saved = {strip_wrappers(name) for name in adapter.full_weights}
    problems = []
    for name, (update, transposed) in list(targets.items()):
        partners = [n for n, i in base_infos.items() if i.alias_of == name]
        partners += [base_infos[name].alias_of] if base_infos[name].alias_of else []
        for partner in partners:
            if strip_wrappers(partner) in saved:
                continue
            if partner in targets and name < partner:
                problems.append(
                    f"'{name}' and '{partner}' share one tensor and both carry an update (PEFT "
                    "0.21's merge adds both, with ensure_weight_tying the same one twice): no "
                    "single weight stands for the trained model; adapt one of the two only")
            elif partner not in targets:
                if update.truncate_base:
                    problems.append(f"'{name}': KaSA on a weight shared with '{partner}' (tied) "
                                    "is not supported")
                    continue
                turned = stored_in_out(partner)
                targets[partner] = (update if turned == transposed else flipped(update), turned)
    return problems


def resolve_targets(
    adapter: Adapter, base_infos: dict[str, TensorInfo],
    heads: Callable[[], tuple[int, int]] = lambda: (1, 1),
) -> dict[str, tuple[LowRankUpdate, bool]]:
    """Base weight name → (update, stored transposed?) for every adapted module, each update in
    the base's row order (``heads``: the base's attention head counts, asked only if needed).

    Raises :class:`TensorMismatchError` listing every module the base lacks or whose shape differs.
    """
    flat: dict[str, str] = {}  # kohya-flattened module paths, with and without wrappers
    for name in base_infos:
        for path in (module_path(name), strip_wrappers(module_path(name))):
            flat.setdefault(kohya_flat(path), name)
    by_parameter = parameter_targets(adapter, base_infos)
    taken = {id(update) for update, _ in by_parameter.values()}
    candidates: dict[str, str] = {}  # candidate weight name -> adapter module
    for module in adapter.updates:
        if id(adapter.updates[module]) in taken:
            continue
        names = [module, *adapter.module_aliases(module)]
        kohya = flat.get(kohya_flat(strip_kohya_prefix(module)))
        for n in names:
            if n + ".weight" in base_infos:
                candidates[n + ".weight"] = module
                break
        else:
            candidates[kohya if kohya else names[-1] + ".weight"] = module
    alignment = align_names(list(base_infos), list(candidates))
    resolved = {b: candidates[t] for b, t in alignment.pairs}
    problems = [f"'{candidates[t]}' has no weight in the base"
                + (_TIED_HINT if module_path(OUTPUT_HEAD) in candidates[t].split(".") else "")
                for t in alignment.tuned_only]
    targets = dict(by_parameter)
    for base_name, module in resolved.items():
        update = adapter.base_order(module, base_name, adapter.updates[module], heads)
        info = base_infos[base_name]
        transposed = _transposed(update, base_name, info)
        problem = _misfit(module, update, base_name, info, transposed)
        if problem:
            problems.append(problem)
        else:
            targets[base_name] = (update, transposed)
    shared = _share_tied(targets, base_infos, adapter) if not problems else []
    if shared:
        raise TensorMismatchError(f"{adapter.path}: {listing(shared, sep='; ')}", shared)
    if problems:
        raise TensorMismatchError(
            f"{adapter.path}: adapter does not fit the base ({len(problems)} module(s)): "
            f"{listing(problems, sep='; ')}; "
            f"is it an adapter for another model"
            + (f" (it names {adapter.base_model})" if adapter.base_model else "") + "?",
            problems,
        )
    return targets
