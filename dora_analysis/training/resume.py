"""A checkpoint to resume, read and compared with the run that continues it before any weight is
loaded.

The settings that shape the trained tensors (method, targets, rank …) must be those the
checkpoint was saved with, or its tensors do not fit: a mismatch is one :class:`ConfigError`
naming each flag with both values. Settings of the optimisation (learning rate, batch size,
seed …) may change, with a :class:`ResumeWarning`: the run then differs from the uninterrupted
one.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointFormatError, ConfigError, ResumeWarning, listing
from .config import TrainConfig

STATE = "trainer_state.json"
#: What a checkpoint needs besides its weights to be continued.
RESUME_FILES = (STATE, "optimizer.pt", "scheduler.pt", "rng_state.pt")
WEIGHTS = {"ft": "model.safetensors", "lora": "adapter_model.safetensors",
           "dora": "adapter_model.safetensors"}

#: Settings that shape the saved tensors, with the flag that sets each.
STRUCTURE = {"method": "--method", "targets": "--targets", "rank": "--rank",
             "alpha": "--alpha", "rslora": "--rslora", "detach_norm": "--full-norm-gradient",
             "magnitude_only": "--magnitude-only", "modules_to_save": "--task"}
#: Facts about the task recorded in ``TrainConfig.extra`` that must agree too.
TASK_FACTS = {"task_type": "--task", "labels": "the labels of --data"}
#: Settings of the optimisation: a change is allowed, and warned about.
OPTIMISATION = {"lr": "--lr", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
                "warmup_steps": "--warmup", "weight_decay": "--weight-decay",
                "max_grad_norm": "--max-grad-norm", "seed": "--seed", "dropout": "--dropout"}


@dataclass(frozen=True)
class Checkpoint:
    """A ``checkpoint-N`` folder written by :func:`.loop.save_checkpoint`."""

    folder: Path
    step: int
    losses: list
    config: dict
    """The :class:`TrainConfig` it was saved with (``TrainConfig.to_json``)."""


def read_checkpoint(folder: Path) -> Checkpoint:
    """The step, losses and settings of a checkpoint, every file it needs checked."""
    where = f"--resume {folder}"
    if not (folder / STATE).is_file():
        raise ConfigError(f"{where}: not a checkpoint folder of dora-train (no {STATE})")
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        step, losses, config = state["global_step"], state["log_history"], state["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"{where}: {STATE} is unreadable or not dora-train's "
                                    f"({type(exc).__name__}: {exc}); resume another checkpoint"
                                    ) from None
    if not (isinstance(step, int) and step >= 1 and isinstance(losses, list)
            and isinstance(config, dict) and config.get("method") in WEIGHTS):
        raise CheckpointFormatError(f"{where}: {STATE} is not dora-train's (global_step, "
                                    "log_history or config missing or of the wrong type)")
    needed = (*RESUME_FILES, WEIGHTS[config["method"]])
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise CheckpointFormatError(f"{where}: {', '.join(missing)} missing; a checkpoint of "
                                    f"dora-train holds {', '.join(needed)}")
    return Checkpoint(folder, step, losses, config)


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "(none)"
    return str(value)


def _same(ours, saved) -> bool:
    if isinstance(ours, (list, tuple)) or isinstance(saved, (list, tuple)):
        return list(ours or ()) == list(saved or ())
    return ours == saved


def conflicts(config: TrainConfig, saved: dict) -> list[str]:
    """The settings of ``config`` whose saved tensors would not fit a checkpoint saved with
    ``saved``, each ``"--rank 8 (here 4)"``. Unresolved ``auto`` targets are not compared."""
    pairs = [(flag, getattr(config, name), saved.get(name)) for name, flag in STRUCTURE.items()
             if not (name == "targets" and "auto" in config.targets)]
    extra = saved.get("extra") or {}
    pairs += [(what, config.extra[name], extra[name]) for name, what in TASK_FACTS.items()
              if name in extra and name in config.extra]  # a library caller may record none
    return [f"{flag} {_shown(theirs)} (here {_shown(ours)})" for flag, ours, theirs in pairs
            if not _same(ours, theirs)]


def check_resumable(config: TrainConfig, checkpoint: Checkpoint, warn: bool = True) -> None:
    """Refuse a checkpoint whose tensors would not fit, or that leaves no step to train; with
    ``warn``, warn about changed settings of the optimisation."""
    where = f"--resume {checkpoint.folder}"
    found = conflicts(config, checkpoint.config)
    if found:
        raise ConfigError(f"{where}: saved with {listing(found, 6, '; ')}; continue it with the "
                          "settings it was saved with, or start a new run")
    if config.steps <= checkpoint.step:
        raise ConfigError(f"{where}: saved at step {checkpoint.step}; --steps {config.steps} "
                          "leaves nothing to train: give more --steps")
    changed = [f"{flag} {_shown(getattr(config, name))} (was "
               f"{_shown(checkpoint.config.get(name))})" for name, flag in OPTIMISATION.items()
               if name in checkpoint.config
               and not _same(getattr(config, name), checkpoint.config[name])]
    if changed and warn:
        warnings.warn(ResumeWarning(f"{where}: the run goes on with {', '.join(changed)}; it "
                                    "will not end where the uninterrupted run would"),
                      stacklevel=2)
