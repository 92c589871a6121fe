"""Checkpoint reference strings (SPEC §3): parsed once, printed back the same.

| form                               | kind     |
|------------------------------------|----------|
| ``path/model.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``*.index.json`` | ``file`` |
| ``path/dir/`` (a model folder)       | ``folder`` |
| ``path/run/`` holding ``checkpoint-N/`` or ``step-N/`` subfolders | ``series`` (one per step) |
| ``org/name``, ``org/name@rev``       | ``hub`` (only when no such local path exists) |
| ``hf://org/name[@rev]/path``, ``s3://…``, ``gs://…``, ``https://…`` | ``remote`` (in place) |

A remote reference is printed back without credentials: ``user:pass@`` and the query string
(presigned-URL signatures, tokens) are dropped from every message (:func:`redact_url`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigError,
    SkippedFoldersWarning,
)
from .guard import not_found, not_regular, path_kind, shown

#: Subfolders that make a folder a training series, one checkpoint per step N: HF Trainer's
#: ``checkpoint-N`` and torchtitan's ``step-N``.
_STEP_DIR = re.compile(r"^(?:checkpoint|step)-(\d+)$")
#: Subfolders named like steps of a series but without a step number (``checkpoint-abc``).
_STEP_LIKE = re.compile(r"^(?:checkpoint|step)-")
#: Folder names that carry a step without making a series (DeepSpeed's ``global_stepN``).
_STEP_NAME = re.compile(r"^(?:checkpoint-|step-|global_step)(\d+)$")
#: Where accelerate / HF Trainer put the model's DCP inside a ``checkpoint-N/`` folder (FSDP).
TRAINER_DCP_FOLDERS: tuple[str, ...] = ("pytorch_model_fsdp_0",)
#: Folders named by the tool, not the user, that a label looks past: the DCP inside a Trainer
#: checkpoint, and torchtitan's ``<dump>/checkpoint/`` holding its ``step-N/``.
_TOOL_FOLDERS = frozenset({*TRAINER_DCP_FOLDERS, "checkpoint"})
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
#: URL schemes read in place through fsspec (``dora_analysis.io.remote``).
REMOTE_SCHEMES = ("hf", "s3", "gs", "gcs", "http", "https")
_URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://", re.IGNORECASE)
T = TypeVar("T")
_GENERIC_STEMS = {"model", "pytorch_model", "adapter_model", "consolidated",
                  "diffusion_pytorch_model"}


def remote_scheme(text: str) -> str | None:
    """The scheme of a remote reference (``s3`` for ``s3://bucket/key``), else None."""
    match = _URL.match(text)
    scheme = match.group("scheme").lower() if match else None
    return scheme if scheme in REMOTE_SCHEMES else None


def redact_url(url: str) -> str:
    """``url`` without credentials: no ``user:pass@``, no query string, no fragment.

    Example:
        >>> redact_url("https://me:secret@host/m.safetensors?X-Amz-Signature=abc")
        'https://host/m.safetensors'
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
    except ValueError:  # a malformed host or port: keep the scheme, drop credentials and query
        scheme, sep, rest = url.partition("://")
        rest = rest.split("?", 1)[0].split("#", 1)[0]
        authority, slash, path = rest.partition("/")
        return scheme + sep + authority.rsplit("@", 1)[-1] + slash + path
    if not netloc:  # urlunsplit would drop the "//" of "s3:///key"
        return f"{parts.scheme}://{parts.path}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_url(url: str) -> None:
    """Refuse a remote reference that is not a URL one can connect to: a malformed host or port
    (``http://[::1:18081/m.safetensors``, ``:99999``), or no host or bucket.

    Example:
        >>> check_url("http://[::1:18081/m.safetensors")
        Traceback (most recent call last):
        dora_analysis.errors.ConfigError: http://[::1:18081/m.safetensors: not a valid URL (...
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number in 0-65535
    except ValueError as exc:
        raise ConfigError(f"{redact_url(url)}: not a valid URL ({exc}); check the host and "
                          "port") from None
    if not parts.hostname:
        raise ConfigError(f"{redact_url(url)}: not a valid URL (no host or bucket after "
                          f"{parts.scheme}://); check the URL")


def step_of(path: Path) -> int | None:
    """The training step of a ``checkpoint-N``/``step-N``/``global_stepN`` folder, or of a
    file or folder directly inside one (``checkpoint-N/pytorch_model_fsdp_0``); else None.

    Example:
        >>> step_of(Path("run/checkpoint-20/pytorch_model_fsdp_0"))
        20
    """
    for part in (path.name, path.parent.name):
        match = _STEP_NAME.match(part)
        if match:
            return int(match.group(1))
    return None


def series_steps(folder: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-N`` / ``step-N`` subfolders of ``folder`` as ``(N, path)``, by step.

    Two subfolders for one step (``checkpoint-10`` and ``checkpoint-010``, or ``step-10`` beside
    ``checkpoint-10``) are an error naming both.
    """
    return steps_among(folder, ((c.name, c) for c in sorted(folder.iterdir()) if c.is_dir()))


def steps_among(folder: object, subfolders: Iterable[tuple[str, T]]) -> list[tuple[int, T]]:
    """The steps of a series among ``(name, subfolder)`` pairs (a local or a remote folder's),
    by step; two subfolders for one step are an error naming both."""
    steps: dict[int, tuple[str, T]] = {}
    for name, child in subfolders:
        match = _STEP_DIR.match(name)
        if not match:
            continue
        step = int(match.group(1))
        if step in steps:
            raise CheckpointFormatError(
                f"{folder}: two checkpoints for step {step}: {steps[step][0]}/ and {name}/; "
                "move one of them out of the run folder")
        steps[step] = (name, child)
    return sorted((step, child) for step, (_, child) in steps.items())


def unnumbered(names: Iterable[str]) -> list[str]:
    """Names like steps of a series but without a step number (``checkpoint-abc``)."""
    return sorted(n for n in names if _STEP_LIKE.match(n) and not _STEP_DIR.match(n))


def unnumbered_steps(folder: Path) -> list[str]:
    """Subfolders named like steps of a series but without a step number (``checkpoint-abc``)."""
    return unnumbered(c.name for c in folder.iterdir() if c.is_dir())


def missing_in_folder(path: Path) -> CheckpointNotFoundError:
    """A path shaped like a Hub id (``ft/checkpoint-3``) whose folder exists here: a local path
    that is missing, never a Hub repo; the error lists what the folder holds (a mistyped step is
    the usual cause)."""
    error = not_found(path)
    try:
        names = sorted(c.name for c in path.parent.iterdir() if not c.name.startswith("."))
    except OSError:
        names = []
    held = f"{shown(path.parent)}/ holds {', '.join(names[:8])}{' …' if len(names) > 8 else ''}; "
    return CheckpointNotFoundError(f"{error} ({held if names else ''}the folder "
                                   f"{shown(path.parent)}/ exists here, so it is not read as a "
                                   "Hugging Face Hub repo id)")


@dataclass(frozen=True)
class CheckpointRef:
    """One parsed reference to a checkpoint, a training series, or a Hub repository."""

    text: str
    kind: str  # "file" | "folder" | "series" | "hub" | "remote"
    path: Path | None = None
    url: str | None = field(default=None, repr=False)
    """A remote reference as given (credentials included, for reading only; never printed)."""
    repo: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> CheckpointRef:
        """Parse a reference; a local path that exists always wins over a Hub id.

        Example:
            >>> CheckpointRef.parse("meta-llama/Llama-3.1-8B@main").revision
            'main'
        """
        if remote_scheme(text):
            check_url(text)
            return cls(redact_url(text), "remote", url=text)
        path = Path(text).expanduser()
        kind = path_kind(path)
        if kind == "file":
            return cls(text, "file", path=path)
        if kind == "folder":
            if not series_steps(path):
                return cls(text, "folder", path=path)
            skipped = unnumbered_steps(path)
            if skipped:
                warnings.warn(f"{path}: subfolder(s) {', '.join(skipped)} skipped: a step of a "
                              "series is named checkpoint-N or step-N with N a number",
                              SkippedFoldersWarning, stacklevel=2)
            return cls(text, "series", path=path)
        if kind == "other":
            raise not_regular(path)
        if _HUB_REPO.match(text) and not text.startswith((".", "/", "~")):
            if path_kind(path.parent) == "folder":
                raise missing_in_folder(path)  # ft/checkpoint-3 with ft/ here: local, not Hub
            repo, _, revision = text.partition("@")
            return cls(text, "hub", repo=repo, revision=revision or None)
        raise not_found(text)

    def __str__(self) -> str:
        return self.text

    @property
    def default_label(self) -> str:
        """A short label: the file stem, or its folder for generic names, or the repo name.

        A ``checkpoint-N`` / ``step-N`` / ``global_stepN`` folder (and the DCP folder inside a
        Trainer checkpoint, torchtitan's ``checkpoint/``) is labelled by its run folder, so steps
        of one run share a label.
        """
        if self.kind == "hub":
            return self.repo.rsplit("/", 1)[-1]
        if self.kind == "remote":
            path = Path(urlsplit(self.url).path.rstrip("/") or "remote")
            stem = path.name.split(".")[0]
            generic = stem in _GENERIC_STEMS or stem.startswith("model-")
            return path.parent.name if generic and path.parent.name else stem
        path = self.path.resolve()
        if self.kind == "file":
            stem = path.name.split(".")[0]
            if stem not in _GENERIC_STEMS and not stem.startswith("model-"):
                return stem
            path = path.parent
        while path.name in _TOOL_FOLDERS or _STEP_NAME.match(path.name):
            path = path.parent
        return path.name or str(path)

    @property
    def step(self) -> int | None:
        """The step of a single step folder or of what lies directly inside one; else None."""
        return step_of(self.path) if self.path is not None and self.kind != "series" else None
