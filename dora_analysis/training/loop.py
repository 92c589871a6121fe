"""A small model-agnostic training loop with checkpoints laid out as the Hugging Face Trainer does.

``OUTPUT/checkpoint-N/`` holds, for FT, ``model.safetensors`` (all weights); for LoRA/DoRA a
PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's names),
plus what resuming needs (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt``,
``trainer_state.json``) and, when an evaluation is given, ``eval_results.json``. Each checkpoint
is written into a temporary folder and renamed into place, so an interrupted run never leaves a
half-written checkpoint. Data order is a function of the step (``batch_at(i)``), so a resumed run
sees the same batches and ends with the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .inject import PEFT_PREFIX, adapter_state_dict, inject_adapters

Batch = dict
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[nn.Module], dict]


def hf_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss a ``transformers`` model returns when the batch has ``labels``."""
    return model(**batch).loss


def prepare(model: nn.Module, config: TrainConfig) -> nn.Module:
    """FT: every weight trainable. LoRA/DoRA: adapters injected, only they (and
    ``modules_to_save``) trainable."""
    if config.method == "ft":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        inject_adapters(model, targets=config.targets, method=config.method, rank=config.rank,
                        alpha=config.alpha, dropout=config.dropout, rslora=config.rslora,
                        detach_norm=config.detach_norm, magnitude_only=config.magnitude_only,
                        modules_to_save=config.modules_to_save)
    return model


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


def peft_adapter_config(config: TrainConfig) -> dict:
    """``adapter_config.json`` in PEFT's schema."""
    return {
        "peft_type": "LORA", "task_type": config.extra.get("task_type"),
        "base_model_name_or_path": config.extra.get("base_model_name_or_path"),
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "use_dora": config.method == "dora",
        "use_rslora": config.rslora, "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": False, "bias": "none", "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


def is_main_process() -> bool:
    """Rank 0 under ``torch.distributed`` (torchrun), or the only process."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_checkpoint(model: nn.Module, config: TrainConfig, step: int, optimizer, scheduler,
                    losses: list[float], metrics: dict | None = None) -> Path:
    """Write ``OUTPUT/checkpoint-<step>/`` atomically (temporary folder, then rename)."""
    model = unwrap(model)
    final = config.output / f"checkpoint-{step}"
    tmp = config.output / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if config.method == "ft":
            state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            save_file(adapter_state_dict(model, config.modules_to_save),
                      str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(
                json.dumps(peft_adapter_config(config), indent=2))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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
    """Put a checkpoint's trained weights back into a prepared model."""
    model = unwrap(model)
    if method == "ft":
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return
    params = dict(model.named_parameters())
    for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
        name = key.removeprefix(PEFT_PREFIX)  # PEFT's names are ours behind the prefix
        target = params.get(name)
        if target is None:
            raise ValueError(f"{folder}: checkpoint tensor '{key}' has no place in this model")
        with torch.no_grad():
            target.copy_(value)


def train(model: nn.Module, batch_at: Callable[[int], Batch], config: TrainConfig, *,
          loss_fn: LossFn = hf_loss, resume: Path | None = None, evaluate: EvalFn | None = None,
          progress: bool = False) -> TrainResult:
    """Fine-tune a prepared model (see :func:`prepare`) and save checkpoints at ``save_steps``.

    ``batch_at(i)`` returns micro-batch ``i``; step ``s`` uses micro-batches
    ``s·grad_accum … s·grad_accum + grad_accum − 1``. Under ``torchrun``, wrap the prepared model
    in ``DistributedDataParallel`` and give each rank its own ``batch_at``; rank 0 saves.
    ``evaluate(model)``, if given, runs in eval mode without gradients before each save; its
    metrics go into the checkpoint (``eval_results.json``) and ``TrainResult.evals``.

    Example:
        >>> model = prepare(model, TrainConfig(method="dora", targets=("query",)))  # doctest: +SKIP
        >>> train(model, batch_at, config)  # doctest: +SKIP
    """
    torch.manual_seed(config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(config.warmup_steps, config.steps))
    result, start = TrainResult(), 0
    if resume is not None:
        state = json.loads((resume / "trainer_state.json").read_text())
        start, result.losses = state["global_step"], list(state["log_history"])
        load_trainable(model, resume, config.method)
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(resume / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(resume / "rng_state.pt", weights_only=True))
    device_type = next(model.parameters()).device.type
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if config.dtype == "bf16"
                else nullcontext())
    model.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=config.method,
               disable=not progress)
    for step in bar:
        total = 0.0
        for micro in range(config.grad_accum):
            with autocast:
                loss = loss_fn(model, batch_at(step * config.grad_accum + micro))
            (loss / config.grad_accum).backward()
            total += float(loss.detach()) / config.grad_accum
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if step + 1 in config.save_steps and config.output is not None and is_main_process():
            metrics = None
            if evaluate is not None:
                metrics = {"step": step + 1, **evaluated(model, evaluate)}
                result.evals.append(metrics)
            result.checkpoints.append(save_checkpoint(model, config, step + 1, optimizer,
                                                      scheduler, result.losses, metrics))
    return result


def evaluated(model: nn.Module, evaluate: EvalFn) -> dict:
    """``evaluate(model)`` in eval mode without gradients; the model is left in train mode."""
    model.eval()
    try:
        with torch.no_grad():
            return evaluate(unwrap(model))
    finally:
        model.train()
