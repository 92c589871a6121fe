"""The run folder (``--output``): one run per folder, so that a series never mixes two runs.

A run writes ``checkpoint-N/`` folders and, with an evaluation, ``eval_results.json`` (every
saved step's scores, rebuilt from the checkpoints after each save). A new run refuses a folder
that holds those outputs of another run (``dora-analyze`` would read its checkpoints as steps of
the new one); a run that continues a checkpoint of its own folder (``--resume
OUTPUT/checkpoint-N``) keeps the steps up to N and refuses the checkpoints after N, which belong
to the continuation it replaces. ``overwrite`` deletes what would be refused instead, with a
:class:`RunFolderWarning` naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

from ..errors import ConfigError, RunFolderWarning, listing

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
EVALS = "eval_results.json"
#: Files a run writes next to its checkpoints that list its steps (``dora-train``'s
#: ``labels.json`` is the same for every step, and rewritten by each run).
RUN_FILES = (EVALS,)


def checkpoints(output: Path) -> dict[int, Path]:
    """The ``checkpoint-N`` folders of a run folder, by step."""
    if not output.is_dir():
        return {}
    found = {}
    for path in output.iterdir():
        match = CHECKPOINT.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def check_writable(output: Path) -> None:
    """``output`` is, or can be made, a folder we can write in."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output}: exists and is not a folder; give a folder for "
                          "the checkpoints")
    ancestor = output
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--output {output}: {ancestor} is a file, so the folder cannot be "
                          "created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: cannot write in {ancestor} (permission denied)")


def continues(output: Path, resume: Path | None) -> bool:
    """Whether a run resumes a checkpoint of its own run folder."""
    return resume is not None and resume.resolve().parent == output.resolve()


def stale_outputs(output: Path, resume: Path | None = None, resume_step: int = 0) -> list[Path]:
    """What in ``output`` a run would mix with its own: every run output for a new run; the
    checkpoints after the resumed step for a run that continues a checkpoint of ``output``."""
    if continues(output, resume):
        return [path for step, path in checkpoints(output).items() if step > resume_step]
    files = [output / name for name in RUN_FILES if (output / name).is_file()]
    return list(checkpoints(output).values()) + files


def claim(output: Path, resume: Path | None = None, resume_step: int = 0, *,
          overwrite: bool = False, delete: bool = True) -> list[Path]:
    """Check that a run may write into ``output``; with ``overwrite`` (and ``delete``), delete
    the outputs it would otherwise refuse. Returns them.

    Example:
        >>> claim(Path("runs/dora"), overwrite=False)  # doctest: +SKIP
        ConfigError: --output runs/dora: holds the outputs of another run (checkpoint-10, …)
    """
    check_writable(output)
    stale = stale_outputs(output, resume, resume_step)
    names = listing([p.name for p in stale], 5)
    if stale and not overwrite:
        if continues(output, resume):
            raise ConfigError(f"--output {output}: holds {names}, saved after the resumed step "
                              f"{resume_step} by the continuation this run replaces; pass "
                              "--overwrite to delete them, or resume the latest checkpoint")
        raise ConfigError(f"--output {output}: holds the outputs of another run ({names}); "
                          "give a new run a folder of its own, continue that run with --resume "
                          "OUTPUT/checkpoint-N, or pass --overwrite to delete them")
    if stale and delete:
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        warnings.warn(RunFolderWarning(f"--overwrite: deleted {names} of an earlier run from "
                                       f"{output}"), stacklevel=2)
    return stale


def collect_evals(output: Path) -> list[dict]:
    """The ``eval_results.json`` of every ``checkpoint-N`` in a run folder, by step."""
    return [json.loads((path / EVALS).read_text()) for path in checkpoints(output).values()
            if (path / EVALS).is_file()]


def write_evals(output: Path) -> Path:
    """``output/eval_results.json``: the scores of every saved step, written atomically."""
    final, tmp = output / EVALS, output / f".{EVALS}.tmp"
    tmp.write_text(json.dumps(collect_evals(output), indent=1))
    os.replace(tmp, final)
    return final
