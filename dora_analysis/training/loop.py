"""A small model-agnostic training loop with checkpoints laid out as the Hugging Face Trainer does.

``OUTPUT/checkpoint-N/`` holds, for FT, ``model.safetensors`` (all weights, plus ``config.json``
for ``transformers`` models, so ``from_pretrained`` loads it); for LoRA/DoRA a PEFT adapter
folder (``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's names), plus what
resuming needs (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt``, ``trainer_state.json``)
and, when an evaluation is given, ``eval_results.json`` (``OUTPUT/eval_results.json`` lists
every saved step's, rewritten after each save). One run per folder: a new run refuses a folder
holding another run's outputs, a resumed one the checkpoints after its step (see
:mod:`.runfolder`). Each checkpoint is written into a temporary folder and renamed into place,
so an interrupted run never leaves a half-written checkpoint. Data order is a function of the
step (``batch_at(i)``), so a resumed run sees the same batches and ends with the same weights.

The batches are moved to the model's device; forward and backward run under autocast in the
configured precision. Under ``torchrun`` (see :mod:`.distributed`) every process runs this loop on
its own batches; saving gathers full tensors on all of them and rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointFormatError, ConfigError, listing
from ..exits import raise_if_signalled
from .accumulation import LossUnits, accumulate, label_units
from .config import TrainConfig
from .distributed import (
    gathered_state,
    is_main_process,
    load_model_entries,
    load_optimizer_state,
    optimizer_state,
    unwrap,
)
from .inject import PEFT_PREFIX, inject_adapters, is_adapter_entry, uses_fan_in_fan_out
from .resume import WEIGHTS, check_resumable, read_checkpoint
from .runfolder import claim, write_evals
from .runtime import autocast, autocast_dtype, model_device

Batch = dict
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[nn.Module], dict]


def hf_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss a ``transformers`` model returns when the batch has ``labels``."""
    return model(**batch).loss


def prepare(model: nn.Module, config: TrainConfig) -> nn.Module:
    """FT: every weight trainable. LoRA/DoRA: adapters injected, only they (and
    ``modules_to_save``) trainable; ``config.targets`` becomes the names actually targeted
    (``auto`` resolved). Gradient checkpointing is switched on for ``transformers`` models."""
    if config.method == "ft":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        chosen = inject_adapters(
            model, targets=config.targets, method=config.method, rank=config.rank,
            alpha=config.alpha, dropout=config.dropout, rslora=config.rslora,
            detach_norm=config.detach_norm, magnitude_only=config.magnitude_only,
            modules_to_save=config.modules_to_save)
        if "auto" in config.targets:
            config.targets = tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for n in chosen))
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (works with frozen inputs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError("--gradient-checkpointing needs a transformers model "
                          f"({type(model).__name__} has no gradient_checkpointing_enable)")
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training, and warned about


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then linear decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: biases and normalisation weights.

    The DoRA authors' code (and the Hugging Face Trainer) decay every other weight, DoRA's
    magnitude included. Norm layers are found by type name (``LayerNorm``, ``LlamaRMSNorm`` …), so
    models that name them differently are covered too.
    """
    names = set()
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias":
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: trainable weights with ``weight_decay``, biases and norms without."""
    exempt = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    """One ``{"step": N, **metrics}`` per saved checkpoint, when an evaluation was given."""


def peft_adapter_config(config: TrainConfig, fan_in_fan_out: bool = False) -> dict:
    """``adapter_config.json`` in PEFT's schema (``fan_in_fan_out`` for ``Conv1D`` targets)."""
    return {
        "peft_type": "LORA", "task_type": config.extra.get("task_type"),
        "base_model_name_or_path": config.extra.get("base_model_name_or_path"),
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "use_dora": config.method == "dora",
        "use_rslora": config.rslora, "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }


def checkpoint_weights(model: nn.Module, config: TrainConfig) -> dict[str, torch.Tensor]:
    """What a checkpoint stores, full tensors on CPU: every weight (FT) or the adapter
    entries under PEFT's names. Collective under FSDP2: every process calls it."""
    if config.method == "ft":
        return gathered_state(model, lambda name: True)
    keep = config.modules_to_save
    state = gathered_state(model, lambda name: is_adapter_entry(name, keep))
    return {PEFT_PREFIX + name: tensor for name, tensor in state.items()}


def save_checkpoint(model: nn.Module, config: TrainConfig, step: int, optimizer, scheduler,
                    losses: list[float], metrics: dict | None = None) -> Path | None:
    """Write ``OUTPUT/checkpoint-<step>/`` atomically (temporary folder, then rename).

    Every process calls this (gathering is collective); rank 0 writes and returns the folder,
    the others return None.
    """
    weights = checkpoint_weights(model, config)
    optim_state = optimizer_state(model, optimizer)
    if not is_main_process():
        return None
    inner = unwrap(model)
    final = config.output / f"checkpoint-{step}"
    tmp = config.output / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if config.method == "ft":
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            hf_config = getattr(inner, "config", None)
            if hasattr(hf_config, "to_json_file"):  # a transformers model: loadable as is
                hf_config.to_json_file(str(tmp / "config.json"))
        else:
            save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(
                peft_adapter_config(config, uses_fan_in_fan_out(inner)), indent=2))
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(torch.get_rng_state(), tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": losses, "config": config.to_json()}, indent=1))
        if metrics is not None:
            (tmp / "eval_results.json").write_text(json.dumps(metrics, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_trainable(model: nn.Module, folder: Path, method: str) -> None:
    """Put a checkpoint's trained weights back into a prepared model: every trained tensor of
    the model, each of its shape, and nothing else."""
    file = folder / WEIGHTS[method]
    if not file.is_file():
        raise CheckpointFormatError(f"{folder}: no {file.name}; resume a checkpoint of a "
                                    f"--method {method} run")
    state = load_file(str(file))
    if method != "ft":  # PEFT's names are ours behind the prefix
        state = {key.removeprefix(PEFT_PREFIX): value for key, value in state.items()}
    inner = unwrap(model)
    shapes = {name: tuple(t.shape) for name, t in inner.state_dict().items()}
    trained = [name for name, p in inner.named_parameters() if p.requires_grad]
    problems = [f"{name} (no place in this model)" for name in sorted(set(state) - set(shapes))]
    problems += [f"{name} {list(t.shape)} (this model: {list(shapes[name])})"
                 for name, t in sorted(state.items())
                 if name in shapes and tuple(t.shape) != shapes[name]]
    problems += [f"{name} (missing)" for name in trained if name not in state]
    if problems:
        raise CheckpointFormatError(f"{folder}: {len(problems)} tensor(s) do not fit the model "
                                    f"being trained: {listing(problems, 4)}; resume a "
                                    "checkpoint saved with the same settings")
    load_model_entries(model, state)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors of a batch on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def train(model: nn.Module, batch_at: Callable[[int], Batch], config: TrainConfig, *,
          loss_fn: LossFn = hf_loss, loss_units: LossUnits | None = None,
          resume: Path | None = None, evaluate: EvalFn | None = None,
          progress: bool = False) -> TrainResult:
    """Fine-tune a prepared model (see :func:`prepare`) and save checkpoints at ``save_steps``.

    ``batch_at(i)`` returns micro-batch ``i`` (on any device: it is moved to the model's); step
    ``s`` uses micro-batches ``s·grad_accum … s·grad_accum + grad_accum − 1``. ``loss_fn``
    returns a micro-batch's mean loss over ``loss_units(batch)`` units (default
    :func:`.accumulation.label_units`: the labels a ``transformers`` model's loss counts, else the
    rows); micro-batches are weighted by their units, so accumulation gives the gradient of one
    big batch (see :mod:`.accumulation`) and ``TrainResult.losses`` are means per unit. Under
    ``torchrun``, wrap the prepared model (:func:`.distributed.wrap`) and give each rank its own
    ``batch_at``; rank 0 saves. ``evaluate(model)``, if given, runs in eval mode without
    gradients before each save (on every rank: a sharded model needs them all); its metrics go
    into the checkpoint (``eval_results.json``) and ``TrainResult.evals``.

    Example:
        >>> model = prepare(model, TrainConfig(method="dora", targets=("query",)))  # doctest: +SKIP
        >>> train(model, batch_at, config)  # doctest: +SKIP
    """
    torch.manual_seed(config.seed)
    device = model_device(model)
    precision = autocast_dtype(config.dtype, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(config.warmup_steps, config.steps))
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    result, start = TrainResult(), 0
    checkpoint = None
    if resume is not None:
        checkpoint = read_checkpoint(resume)
        check_resumable(config, checkpoint)
        start, result.losses = checkpoint.step, list(checkpoint.losses)
    if config.output is not None:
        claim(config.output, resume, start, overwrite=config.overwrite,
              delete=is_main_process())
    if checkpoint is not None:
        load_trainable(model, resume, config.method)
        load_optimizer_state(model, optimizer,
                             torch.load(resume / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(resume / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(resume / "rng_state.pt", weights_only=True))
    model.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=config.method,
               disable=not progress or not is_main_process())
    units = loss_units or label_units(model)

    def forward(batch: Batch) -> torch.Tensor:  # one micro-batch on the device at a time
        batch = to_device(batch, device)
        with autocast(precision, device):
            return loss_fn(model, batch)

    def backward(loss: torch.Tensor) -> None:
        scaler.scale(loss).backward()

    for step in bar:
        raise_if_signalled()  # a Ctrl-C whose exception a finalizer swallowed stops here
        # counted where batch_at made them (the CPU, for dora-train): no device sync
        batches = [batch_at(step * config.grad_accum + micro) for micro in range(config.grad_accum)]
        total = accumulate(batches, forward, units, backward, device, step)
        scaler.unscale_(optimizer)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if step + 1 in config.save_steps and config.output is not None:
            metrics = None
            if evaluate is not None:
                metrics = {"step": step + 1, **evaluated(model, evaluate, precision, device)}
                result.evals.append(metrics)
            saved = save_checkpoint(model, config, step + 1, optimizer, scheduler,
                                    result.losses, metrics)
            if saved is not None:
                result.checkpoints.append(saved)
                if metrics is not None:
                    write_evals(config.output)
    return result


def evaluated(model: nn.Module, evaluate: EvalFn, precision: torch.dtype | None = None,
              device: torch.device | None = None) -> dict:
    """``evaluate(model)`` in eval mode without gradients (and in the training precision); the
    model is left in train mode."""
    model.eval()
    try:
        with torch.no_grad(), autocast(precision, device or model_device(model)):
            return evaluate(unwrap(model))
    finally:
        model.train()
