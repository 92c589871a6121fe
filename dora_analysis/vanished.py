"""Checkpoints that vanish while they are read: a trainer's ``save_total_limit`` rotation.

A Hugging Face Trainer deletes its oldest ``checkpoint-N/`` folders as it saves new ones, so a
series analysed while it trains can lose a step between the listing and the reading, or in the
middle of it. Only such steps (a tuned checkpoint with a step: ``run/checkpoint-N`` given alone
too) are said to vanish; any other file that goes is its reader's error, as before. Whatever
the reader then reports (a file not found, a file deleted while read, a shard index whose
shards are gone), the checkpoint's folder is gone, or going: this module tells
that apart from a damaged checkpoint, waiting up to :data:`GRACE_S` for a deletion in progress
(files go one by one, the folder last).

Without ``skip_vanished`` the run stops with :class:`~dora_analysis.errors.VanishedCheckpointError`
naming the checkpoint; with it (``--skip-vanished``), the checkpoint is left out with a
:class:`~dora_analysis.errors.VanishedCheckpointWarning` and the others are analysed (the pairs
already computed are kept, not computed again).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    VanishedCheckpointError,
    VanishedCheckpointWarning,
    listing,
)

if TYPE_CHECKING:
    from .analysis import Plan, TunedCheckpoint

#: Seconds to wait for a checkpoint being deleted to be gone.
GRACE_S = 2.0
POLL_S = 0.05
#: Errors a reader gives for a checkpoint whose files are being deleted.
READ_ERRORS = (CheckpointNotFoundError, CheckpointFormatError)


def gone(checkpoint: TunedCheckpoint) -> bool:
    """Whether a local step of a series (``checkpoint-N``, ``step-N``: what trainers rotate) is
    no longer there. Any other checkpoint that goes is the reader's own error, as is a remote one
    (nothing tells a deleted object from one a worker cannot see)."""
    path = checkpoint.path
    return (checkpoint.step is not None and isinstance(path, (str, os.PathLike))
            and not os.path.lexists(path))


def vanished(checkpoints: Sequence[TunedCheckpoint], error: BaseException) -> list[int]:
    """The positions of the checkpoints that are gone (:func:`gone`) after ``error``, waiting up
    to :data:`GRACE_S` for one being deleted when ``error`` is a reading error; empty when none
    is."""
    if not isinstance(error, READ_ERRORS):
        return []
    if not any(ck.step is not None for ck in checkpoints):
        return []
    deadline = time.monotonic() + GRACE_S
    while True:
        found = [i for i, ck in enumerate(checkpoints) if gone(ck)]
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(POLL_S)


def refuse_or_warn(checkpoints: Sequence[TunedCheckpoint], skip: bool, error: BaseException
                   ) -> None:
    """Stop with the error naming the vanished checkpoints, or (``skip``) warn that they are left
    out."""
    names = [ck.ref for ck in checkpoints]
    what = f"{listing(names)}: {'checkpoint' if len(names) == 1 else 'checkpoints'}"
    if not skip:
        raise VanishedCheckpointError(
            f"{what} vanished while being read (deleted; a trainer's save_total_limit rotates "
            "old checkpoints away); --skip-vanished (skip_vanished=True) analyses the others"
        ) from error
    warnings.warn(f"{what} vanished while being read (deleted; rotated away by the trainer?); "
                  "left out, the others analysed", VanishedCheckpointWarning, stacklevel=4)


def check_opened(checkpoint: TunedCheckpoint, error: BaseException, skip: bool) -> None:
    """At planning: return (leaving the checkpoint out, with a warning) when ``checkpoint``
    vanished and ``skip``; raise the vanished error when it vanished; else re-raise ``error``."""
    if not vanished([checkpoint], error):
        raise error
    refuse_or_warn([checkpoint], skip, error)


def without_vanished(work: Plan, error: BaseException) -> Plan:
    """After ``error`` stopped a run: the plan without the jobs whose checkpoint vanished (see
    :func:`refuse_or_warn`); ``error`` re-raised when none did."""
    lost = vanished([job.checkpoint for job in work.jobs], error)
    if not lost:
        raise error
    refuse_or_warn([work.jobs[i].checkpoint for i in lost], work.config.skip_vanished, error)
    jobs = tuple(job for i, job in enumerate(work.jobs) if i not in lost)
    if not jobs:
        raise VanishedCheckpointError("every tuned checkpoint vanished while being read; "
                                      "nothing is left to analyse") from error
    return dataclasses.replace(work, jobs=jobs)
