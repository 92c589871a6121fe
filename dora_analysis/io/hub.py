"""Hugging Face Hub references (``org/name``, ``org/name@revision``): the only module that imports
``huggingface_hub``.

Only the files a checkpoint needs are fetched (``allow_patterns``): first the small JSON files
that say what the repository holds, then the adapter weights, the shards listed by the index, or
the single weight file. The environment is read at call time: ``HF_HUB_OFFLINE`` (cache only),
``HF_HUB_CACHE`` / ``HF_HOME`` (where the cache is), ``HF_TOKEN`` (or ``token=``; never logged).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointNotFoundError

_TRUE = {"1", "true", "yes", "on"}

#: What to fetch after the JSON files, by what they reveal (a marker file, then the patterns;
#: first match wins): :data:`dora_analysis.io.formats.HUB_WEIGHT_CHOICES`, given by the caller.
Choices = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Snapshot:
    """A repository revision available on disk."""

    repo: str
    commit: str
    folder: Path

    def __str__(self) -> str:
        return f"{self.repo}@{self.commit}"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home) / "hub"


def _download(repo: str, revision: str | None, patterns: list[str], token: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}@{revision}" if revision else repo
    try:
        folder = snapshot_download(
            repo, revision=revision, allow_patterns=patterns, cache_dir=cache_dir(),
            local_files_only=offline(), token=token,
        )
    except GatedRepoError:
        raise CheckpointNotFoundError(f"{where}: gated repository; accept its terms on the Hub "
                                      "and set HF_TOKEN (or --token)") from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(f"{where}: no such revision on the Hub; check the branch, "
                                      "tag or commit after '@'") from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(f"{repo}: no such repository on the Hub (or it is private: "
                                      "set HF_TOKEN or pass --token)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
        raise CheckpointNotFoundError(
            f"{where}: not in the local cache ({cache_dir()}) and {why}; download it once "
            "online, or point HF_HUB_CACHE/HF_HOME at the cache that has it") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointNotFoundError(f"{where}: cannot download ({str(exc).splitlines()[0]})"
                                      ) from None
    return Path(folder)


def filesystem(token: str | None = None):
    """The Hub as an fsspec filesystem (``hf://org/name[@rev]/path``) for reading in place.

    ``HF_ENDPOINT`` (a mirror) and ``HF_TOKEN`` are read at call time.

    Example:
        >>> fs = filesystem()  # doctest: +SKIP
        >>> fs.info("org/model/model.safetensors")["size"]  # doctest: +SKIP
    """
    if offline():
        raise CheckpointNotFoundError("hf:// reads the Hub in place but HF_HUB_OFFLINE is set; "
                                      "unset it, or give the repository as org/name to use the "
                                      "local cache")
    from huggingface_hub import HfFileSystem

    return HfFileSystem(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token,
                        skip_instance_cache=True)


def _weight_patterns(folder: Path, choices: Choices) -> list[list[str]]:
    """Candidate pattern lists for the weights, in order of preference."""
    for marker, files in choices:
        if marker and not (folder / marker).is_file():
            continue
        if marker.endswith(".index.json"):
            try:
                weight_map = json.loads((folder / marker).read_text())["weight_map"]
                return [sorted(set(weight_map.values()))]
            except (OSError, ValueError, KeyError, TypeError):
                return [[marker]]  # the reader will report the broken index
        return [[f] for f in files]
    return []


def snapshot(repo: str, revision: str | None = None, *, token: str | None = None,
             choices: Choices) -> Snapshot:
    """Fetch (or find in the cache) the files a checkpoint needs; returns where they are.

    Example:
        >>> snap = snapshot("org/model", "main", choices=HUB_WEIGHT_CHOICES)  # doctest: +SKIP
        >>> snap.folder, snap.commit  # doctest: +SKIP
    """
    folder = _download(repo, revision, ["*.json"], token)
    for patterns in _weight_patterns(folder, choices):
        folder = _download(repo, revision, patterns, token)
        if all(any(folder.glob(p)) for p in patterns):
            return Snapshot(repo, folder.name, folder)
    where = f"{repo}@{revision}" if revision else repo
    state = "in the local cache" if offline() else "in the repository"
    raise CheckpointNotFoundError(f"{where}: no weights {state} (looked for adapter_model.*, "
                                  "model.safetensors(.index.json), pytorch_model.bin(.index.json))")
