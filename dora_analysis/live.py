"""``analyze_model(model, base)``: the analysis table of a model that is still in memory — a
plain module, a PEFT-wrapped one, or one with this project's LoRA/DoRA layers — without saving
it. For custom training loops and notebooks; the rows are those :func:`~dora_analysis.analyze`
gives for the same weights saved to disk.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .analysis import (
    Job,
    Ref,
    TunedCheckpoint,
    _as_ref,
    check_modules,
    check_modules_planned,
    matrix_infos,
    plan_pairs,
    run_job,
    to_frame,
)
from .config import AnalysisConfig, check_method
from .errors import (
    CheckpointFormatError,
    ConfigError,
    TensorMismatchError,
    listing,
)
from .io.base import TensorSource
from .io.memory import StateDictSource, base_weights, open_module
from .io.open import open_checkpoint, resolve
from .pairs import MatrixPair, Workspace

Base = Ref | nn.Module | Mapping[str, torch.Tensor]


#: Names of state-dict entries that only a module with injected adapters has.
INJECTED = re.compile(r"(^|\.)(base_layer|original_module|lora_[AB]|lora_embedding_[AB])\.")


def base_tensors(base: Base) -> Mapping[str, torch.Tensor] | None:
    """The pre-trained tensors of a module — read through adapter layers injected into it in
    place (:func:`~dora_analysis.io.memory.base_weights`) — or of a state dict; None for a
    checkpoint reference."""
    if isinstance(base, nn.Module):
        return base_weights(base)
    if isinstance(base, Mapping):
        injected = next((k for k in base if isinstance(k, str) and INJECTED.search(k)), None)
        if injected is not None:
            raise ConfigError(
                f"base: the state dict holds adapter layers ({injected}): it was taken after "
                "get_peft_model injected them; pass the module itself (its adapter layers are "
                "read through to the pre-trained weights), or a state dict taken before")
        return base
    return None


def refuse_trained_base(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Stop when the base holds a weight that the model trains (the same memory): the model was
    made from the base in place (full fine-tuning, or a head trained in full next to adapters
    by layers that keep no original), so the base no longer holds that weight's pre-trained
    values and its change would read as zero."""
    trained = {p.data_ptr() for p in model.parameters() if p.requires_grad and p.numel()}
    shared = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.numel()
              and t.data_ptr() in trained]
    if shared:
        which = (f"{shared[0]} is" if len(shared) == 1
                 else f"{len(shared)} tensors ({listing(shared)}) are")
        raise ConfigError(
            f"base: {which} trained by the model in place (the same memory), so the base no "
            "longer holds the pre-trained "
            "values; pass the checkpoint the base was loaded from, or a copy taken before "
            "training (copy.deepcopy)")


def open_base(base: Base, config: AnalysisConfig, model: nn.Module | None = None
              ) -> TensorSource:
    """The base as a source: a checkpoint reference, a module or a state dict
    (:func:`base_tensors`); refused when ``model`` trains a weight of it in place."""
    tensors = base_tensors(base)
    if tensors is None:
        path, _ = resolve(_as_ref(base), config.token)
        return open_checkpoint(path, config.read_options)
    if model is not None:
        refuse_trained_base(model, tensors)
    label = f"<{type(base).__name__}>" if isinstance(base, nn.Module) else "<state dict>"
    return StateDictSource(tensors, label)


def refuse_shards(tensors, what: str) -> None:
    """Stop with advice when ``tensors`` (name, tensor pairs) hold a ``DTensor``: a rank's shard
    of an FSDP2 / tensor-parallel model, whose norms are not the matrix's."""
    for name, tensor in tensors:
        kind = type(tensor)
        if kind.__name__ == "DTensor" and kind.__module__.startswith("torch.distributed"):
            raise ConfigError(
                f"{what}: {name} is a DTensor shard (FSDP2 or tensor parallel), and a shard's "
                "row norms are not the matrix's; analyse the checkpoint the run saves instead "
                "(DoraAnalysisCallback does, on the main process), or a model gathered whole")


def model_pairs(model_src: TensorSource, base_src: TensorSource, config: AnalysisConfig,
                label: str) -> list[MatrixPair]:
    """The matrix pairs of a model against its base; every shape problem reported at once."""
    base_infos = matrix_infos(base_src)
    if not base_infos:
        raise CheckpointFormatError(f"{base_src.path}: holds no floating-point weight matrices")
    check_modules(config, base_infos, "the base")
    pairs, mismatches = plan_pairs(base_infos, matrix_infos(model_src), config, Path(label),
                                   model_src.transposed, partial=model_src.partial)
    if mismatches and not config.skip_mismatched:
        raise TensorMismatchError(
            f"{len(mismatches)} tensor(s) of {label} differ in shape from the base: "
            f"{listing(mismatches)}; is this the right base?", mismatches)
    if not pairs:
        raise TensorMismatchError(f"{label}: no weight matrix in common with the base (after the "
                                  "filters); is this the right base?")
    check_modules_planned(config, [p.name for p in pairs])
    return pairs


def check_model(model: nn.Module, base: Base, config: AnalysisConfig | None = None,
                label: str = "model") -> None:
    """Raise :class:`TensorMismatchError` unless ``base`` is the base of ``model`` (names and
    shapes; the base's headers only, no weight is compared).

    Example:
        >>> check_model(peft_model, "meta-llama/Llama-3.2-1B")  # doctest: +SKIP
    """
    config = config or AnalysisConfig()
    with open_base(base, config, model) as base_src, \
            open_module(model, base_src, label) as model_src:
        model_pairs(model_src, base_src, config, label)


def analyze_model(
    model: nn.Module,
    base: Base,
    *,
    label: str = "model",
    step: int | None = None,
    method: str = "auto",
    config: AnalysisConfig | None = None,
    **settings,
) -> pd.DataFrame:
    """Compare an in-memory model with its base: one row per (matrix, axis), as :func:`analyze`.

    Args:
        model: the tuned model — plain (its weights are compared), PEFT-wrapped or with this
            project's adapter layers (the adapter is merged with ``base`` as it is read, exactly
            as a saved adapter folder would be; adapters must not be merged into the model).
        base: the pre-trained weights: a checkpoint reference (file, folder, ``org/name``), a
            module, or a state dict.
        label, step: the ``checkpoint`` and ``step`` columns of the rows.
        method: ``auto`` (``lora``/``dora`` from the adapter, else ``unknown``) or a method name.
        config: an :class:`AnalysisConfig`, or its fields as keywords (``modules=("q", "v")``).

    Example:
        >>> table = analyze_model(peft_model, "meta-llama/Llama-3.2-1B", step=100)  # doctest: +SKIP
    """
    if config is None:
        config = AnalysisConfig.from_settings(**settings)
    elif settings:
        raise ConfigError("pass either config= or keyword settings, not both")
    check_method(method)
    if not isinstance(label, str) or not label:
        raise ConfigError(f"label must be a non-empty string, got {label!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral)
                             or step < 0):
        raise ConfigError(f"step must be a whole number ≥ 0 or None, got {step!r}")
    refuse_shards(model.named_parameters(), label)
    if isinstance(base, nn.Module):
        refuse_shards(base.named_parameters(), "base")
    elif isinstance(base, Mapping):
        refuse_shards(base.items(), "base")
    with torch.no_grad(), open_base(base, config, model) as base_src, \
            open_module(model, base_src, label) as model_src:
        pairs = model_pairs(model_src, base_src, config, label)
        resolved = model_src.method if method == "auto" else method
        named = "" if isinstance(base, nn.Module | Mapping) else str(base)  # a module: no name
        job = Job(TunedCheckpoint(label, method, step, Path(label), label), resolved, tuple(pairs),
                  base=named)
        records = run_job(job, base_src, model_src, config, workspace=Workspace())
    return to_frame(records, config)
