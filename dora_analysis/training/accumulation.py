"""Gradient accumulation in which every unit of the loss weighs the same.

A loss is a mean over its units: target tokens for a causal LM, examples for a classifier.
Averaging each micro-batch's mean and then the micro-batches weighs a token of a micro-batch with
few targets more than one of a micro-batch with many (transformers' gradient-accumulation bug,
fixed there in 4.46): with batch 4 × accumulation 2 the gradient is not that of batch 8. Here
micro-batch *i* of a step, holding n_i of the step's N units (counted over every process), adds
``mean_i · n_i / N`` to the objective, so the step's gradient is that of the mean over all N
units, whatever the split into micro-batches and processes. DDP and FSDP2 average gradients over
the W processes, so each process scales its share by W.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import TrainingDataError
from .data import IGNORE
from .distributed import unwrap

Batch = dict
LossUnits = Callable[[Batch], int]
"""How many units the loss of a micro-batch averages over."""


def rows(batch: Batch) -> int:
    """The examples of a batch: the length of its first tensor."""
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return 0 if first is None else len(first)


def shifts_labels(model: nn.Module) -> bool:
    """Whether a ``transformers`` model's loss predicts label t + 1 at position t (causal LMs,
    decoder-only generation), the rule transformers' Trainer uses to count tokens."""
    loss_type = getattr(model, "loss_type", None)
    if loss_type is None:
        return False
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return LOSS_MAPPING.get(loss_type) is ForCausalLMLoss and not encoder_decoder


def label_units(model: nn.Module) -> LossUnits:
    """The units a ``transformers`` model's own loss averages over: the labels other than
    ``-100`` (after the first position for causal LMs); a batch without ``labels`` counts its
    rows.

    Example:
        >>> label_units(causal_lm)({"labels": torch.tensor([[-100, 5, 6]])})  # doctest: +SKIP
        2
    """
    shifted = shifts_labels(unwrap(model))

    def units(batch: Batch) -> int:
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor):
            return rows(batch)
        counted = labels[..., 1:] if shifted else labels
        return int((counted != IGNORE).sum())

    return units


def replicas() -> int:
    """Processes that average their gradients (1 outside ``torch.distributed``)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def summed_over_processes(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` summed over every process, through ``device`` (NCCL needs the GPU); a
    collective, and ``values`` unchanged in a single process."""
    if replicas() > 1:
        values = values.to(device, copy=True)
        torch.distributed.all_reduce(values)
    return values


def accumulate(batches: Sequence[Batch], forward: Callable[[Batch], torch.Tensor],
               units: LossUnits, backward: Callable[[torch.Tensor], None],
               device: torch.device, step: int = 0) -> float:
    """Forward and backward every micro-batch of one optimizer step, each weighted by its share
    of the step's units over all processes; returns the step's mean loss per unit (over all
    processes).

    ``forward(batch)`` returns the micro-batch's mean loss (moving it to the model's device),
    ``backward(loss)`` runs the backward pass (through a gradient scaler, say); ``device`` is
    where the collectives run.

    Example:
        >>> accumulate(batches, lambda b: model(**b).loss, label_units(model),
        ...            lambda loss: loss.backward(), device)  # doctest: +SKIP
    """
    counts = [units(batch) for batch in batches]
    empty = [i for i, n in enumerate(counts) if n == 0]
    # one collective for the total and for "some process has an empty micro-batch", so that
    # every process raises together instead of leaving the others waiting
    total, empties = summed_over_processes(torch.tensor([sum(counts), len(empty)]),
                                           device).tolist()
    if empties:
        where = (f"micro-batch {empty[0]} of step {step + 1}" if empty else
                 f"a micro-batch of step {step + 1} on another process")
        raise TrainingDataError(f"{where} has no target to learn from (every label is "
                                f"{IGNORE}); each example needs a label the loss counts")
    scale = replicas() / total
    loss_sum = torch.zeros((), device=device)
    for batch, count in zip(batches, counts, strict=True):
        loss = forward(batch)
        backward(loss * (count * scale))
        loss_sum += loss.detach().float() * count
    return float(summed_over_processes(loss_sum, device)) / total
