"""Which base weight each of an adapter's updates applies to, and in which orientation: names
aligned (PEFT modules, ``target_parameters``, kohya's flattened paths, tied heads), shapes
checked, every misfit listed in one error."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import TensorMismatchError, listing
from .adapters import Adapter, kohya_flat, strip_kohya_prefix
from .base import TensorInfo
from .factors import LowRankUpdate, flipped
from .keys import align_names, module_path, stored_in_out, strip_wrappers
from .tied import OUTPUT_HEAD


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
                    "0.21–0.22 merge adds both, with ensure_weight_tying the same one twice): no "
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
