"""Every input of ``dora-train`` checked before the work starts, in one place.

:func:`check_arguments` runs before anything heavy is loaded: the flags (:class:`TrainConfig`),
``--model`` (a folder with ``config.json``, or a Hub id), the run folder (:mod:`.runfolder`), the
checkpoint to resume (:mod:`.resume`: its files, and its settings against the flags) and the
data files (read and checked by the task, field by field).
:func:`check_model` runs on the model's config and tokenizer, before the data is tokenized and
the weights are loaded: ``--max-length`` against the model's positions, the padding the task
needs. What only the model in hand can tell — which modules ``--targets`` and
``--magnitude-only`` name, ``auto`` against a resumed checkpoint — is checked by
:func:`.loop.prepare` and :func:`.loop.train` before the first step.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .config import TrainConfig
from .resume import Checkpoint, check_resumable, read_checkpoint
from .runfolder import claim

TYPE_CHECKING = False
if TYPE_CHECKING:  # tasks import torch: only when the arguments are checked
    from .tasks import CausalLanguageModelling, SequenceClassification

#: Float flags that must be finite (``inf`` and ``nan`` pass argparse's ``float``).
FINITE = {"alpha": "--alpha", "dropout": "--dropout", "lr": "--lr",
          "weight_decay": "--weight-decay", "max_grad_norm": "--max-grad-norm"}


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_config(args: argparse.Namespace, modules_to_save=(), extra=None) -> TrainConfig:
    """The :class:`TrainConfig` the flags describe (validated)."""
    for name, flag in FINITE.items():
        if not math.isfinite(getattr(args, name)):
            raise ConfigError(f"{flag} must be a finite number, got {getattr(args, name)}")
    if args.max_length < 2:
        raise ConfigError("--max-length must be at least 2")
    return TrainConfig(
        method=args.method, targets=_names(args.targets),
        magnitude_only=_names(args.magnitude_only), rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, rslora=args.rslora, detach_norm=not args.full_norm_gradient,
        modules_to_save=tuple(modules_to_save), lr=args.lr, steps=args.steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
        seed=args.seed, save_steps=_ints(args.save_steps, "--save-steps"), output=args.output,
        overwrite=args.overwrite, device=args.device, dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing, parallel=args.parallel,
        extra=dict(extra or {}),
    )


#: What ``from_pretrained`` takes for a Hub repository: ``name`` or ``org/name``.
HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")


def check_model_reference(model: str) -> None:
    """``--model`` is a model folder with a ``config.json``, or could be a Hub id."""
    path = Path(model).expanduser()
    if path.is_file():
        raise ConfigError(f"{model}: a file, not a model folder; give the folder that holds "
                          "config.json, the weights and the tokenizer")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{model}: no config.json; give a transformers model folder "
                          "(config.json, weights and tokenizer files) or a Hub id")
    if not path.exists() and not HUB_ID.fullmatch(model):
        raise ConfigError(f"{model}: no such model folder (nor a Hub id such as org/name)")


@dataclass
class Checked:
    """What :func:`check_arguments` found: the settings, the task with its data read and
    checked, and the checkpoint to resume (or None)."""

    config: TrainConfig
    task: SequenceClassification | CausalLanguageModelling
    resume: Checkpoint | None


def check_arguments(args: argparse.Namespace) -> Checked:
    """Check the flags, ``--output``, ``--resume`` and the data files, loading no model;
    raises a :class:`DoraAnalysisError` subclass naming the first problem."""
    from .tasks import TASKS

    build_config(args)  # the flags alone, before any file is read
    check_model_reference(args.model)
    if args.task == "seq-cls" and args.text_field == args.label_field:
        raise ConfigError(f"--text-field and --label-field both name '{args.text_field}'; the "
                          "text and the label are two fields")
    resume = read_checkpoint(args.resume) if args.resume is not None else None
    claim(args.output, args.resume, resume.step if resume else 0, overwrite=args.overwrite,
          delete=False)
    task = TASKS[args.task](args)  # reads and checks the data files
    config = build_config(args, task.modules_to_save, {
        "task_type": task.peft_task_type, "base_model_name_or_path": args.model,
        **task.extra()})
    if resume is not None:
        check_resumable(config, resume, warn=False)  # train() warns, once the model is ready
    return Checked(config, task, resume)


def max_positions(hf_config) -> int | None:
    """The longest input a ``transformers`` model takes, if its config says."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model(args: argparse.Namespace, task, hf_config, tokenizer) -> None:
    """Check ``--max-length`` against the model's positions and fit the tokenizer to the task's
    batches, from the model's config and tokenizer (before its weights are loaded)."""
    limit = max_positions(hf_config)
    if limit is not None and args.max_length > limit:
        raise ConfigError(f"--max-length {args.max_length} is longer than the {limit} positions "
                          f"of {args.model}; use --max-length {limit} or less")
    task.fit_tokenizer(tokenizer)
