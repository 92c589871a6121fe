"""The work of a run as plain data: the tuned checkpoints, one :class:`Job` per checkpoint and
the :class:`Plan` that holds them. :mod:`dora_analysis.plan` makes a plan; the executors
(:mod:`dora_analysis.executors`, :mod:`dora_analysis.integrations.dask`) run one; nothing here
reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .io.refs import CheckpointRef

if TYPE_CHECKING:
    from .config import AnalysisConfig
    from .io.identity import FileIdentity
    from .pairs import MatrixPair

Ref = str | Path | CheckpointRef


@dataclass(frozen=True)
class TunedCheckpoint:
    """One tuned checkpoint to compare: a single file/folder or one step of a series."""

    label: str
    method: str
    step: int | None
    path: Path
    ref: str


@dataclass(frozen=True)
class Job:
    """One tuned checkpoint's share of the work: the matrix pairs to compare with the base."""

    checkpoint: TunedCheckpoint
    method: str
    """The method after detection (``auto`` resolved from the checkpoint)."""
    pairs: tuple[MatrixPair, ...]
    adapter: bool = False
    """The tuned checkpoint is an adapter merged with the base as it is read (closed form)."""
    files: tuple[tuple[str, FileIdentity], ...] = ()
    """The files planning opened for this checkpoint, with their identity then (see
    :mod:`dora_analysis.io.identity`): whoever reads them later checks they did not change."""
    base: str = ""
    """The base reference as given (the table's ``base`` column); empty when there is none to
    name (an in-memory model)."""

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.pairs)


@dataclass(frozen=True)
class Plan:
    """Everything :func:`run_job` needs, checked: the base and one job per tuned checkpoint."""

    base: Path
    jobs: tuple[Job, ...]
    config: AnalysisConfig
    base_files: tuple[tuple[str, FileIdentity], ...] = ()
    """The base's files as planning found them (see :attr:`Job.files`)."""

    @property
    def numel(self) -> int:
        return sum(job.numel for job in self.jobs)

    def files(self, job: int) -> dict[str, FileIdentity]:
        """Path → planned identity of every file a unit of ``job`` may open."""
        return dict(self.base_files) | dict(self.jobs[job].files)


def as_ref(ref: Ref) -> CheckpointRef:
    """A reference as given (a path or a string) parsed, or a parsed one as it is."""
    return ref if isinstance(ref, CheckpointRef) else CheckpointRef.parse(str(ref))
