"""Every error the library raises, in one place.

Each class is also a built-in type (``CheckpointNotFoundError`` is a ``FileNotFoundError``), so
callers that do not know this package can still catch them. The library raises; only the CLI (and
the app) turn errors into one-line messages and exit codes.
"""

from __future__ import annotations


class DoraAnalysisError(Exception):
    """Base class: a problem with the user's input that the user can fix."""


class CheckpointNotFoundError(DoraAnalysisError, FileNotFoundError):
    """A checkpoint reference names no file, folder or repository that exists."""


class CheckpointFormatError(DoraAnalysisError, ValueError):
    """A checkpoint exists but cannot be read: corrupt, truncated, or of an unknown layout."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A pickle that would execute code; refused, never unpickled."""


class CheckpointChangedError(CheckpointFormatError):
    """A checkpoint file was truncated, rewritten, replaced or deleted while it was being read."""


class VanishedCheckpointError(CheckpointNotFoundError):
    """A tuned checkpoint was deleted while it was being read (a trainer rotating its
    checkpoints away); ``skip_vanished`` analyses the others instead."""


class UnsupportedAdapterError(CheckpointFormatError):
    """An adapter whose merge this reader does not implement (a PEFT type, or a ``LoraConfig``
    field away from its default): refused by name, never read as something else."""


class TensorMismatchError(DoraAnalysisError, ValueError):
    """Base and tuned checkpoints disagree (shapes, or no common weight matrices).

    ``problems`` lists every offending tensor, not just the first.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class ConfigError(DoraAnalysisError, ValueError):
    """An invalid setting (axis, module filter, regex, labels ...)."""


class OutputError(DoraAnalysisError, OSError):
    """An output file cannot be written where it was asked for."""


class TableFormatError(DoraAnalysisError, ValueError):
    """A file given as an analysis table is not one (unknown format, unreadable, or columns
    missing)."""


class TrainingDataError(DoraAnalysisError, ValueError):
    """Training data that cannot be used: a missing file, missing fields, no examples."""


class CacheError(DoraAnalysisError, OSError):
    """The results cache cannot be cleared where it was asked for (a run merely goes on
    without a cache it cannot use)."""


class ClusterError(DoraAnalysisError, ConnectionError):
    """The Dask cluster cannot be reached, or its workers keep dying."""


def listing(items: list[str], limit: int = 8, sep: str = ", ") -> str:
    """Join problem items for one message, all of them up to ``limit``, then "… and N more"."""
    shown = sep.join(items[:limit])
    return shown + (f" … and {len(items) - limit} more" if len(items) > limit else "")


class NonFiniteWeightWarning(UserWarning):
    """A weight matrix holds NaN or Inf; the affected vectors are excluded and counted."""


class UnmatchedTensorsWarning(UserWarning):
    """Some weight matrices exist in only one of the two checkpoints and were skipped."""


class AdapterWarning(UserWarning):
    """An adapter's files disagree with its config (e.g. ``use_dora`` without magnitudes)."""


class SkippedFoldersWarning(UserWarning):
    """Subfolders of a training series that look like steps but carry no step number."""


class TruncationWarning(UserWarning):
    """Training examples longer than the context were truncated (never silently dropped)."""


class VanishedCheckpointWarning(UserWarning):
    """Tuned checkpoints deleted while they were read were left out (``skip_vanished``)."""


class AnalysisCallbackWarning(UserWarning):
    """The analysis inside a training run was skipped for a checkpoint; training goes on."""


class RunFolderWarning(UserWarning):
    """``--overwrite`` deleted the outputs of an earlier run from a run folder."""


class ResumeWarning(UserWarning):
    """A resumed run goes on with training settings other than those it was saved with."""
