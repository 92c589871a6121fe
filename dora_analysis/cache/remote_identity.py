"""The identity of a remote checkpoint (``hf://``, ``s3://``, ``gs://``, ``https://``): each file's
content id as the storage reports it (ETag, hash, the Hub's blob id) and its size.

Which files: a file URL is itself (a shard index: with every file of its folder); a folder URL is
every file under it where the storage can list (``hf://``, ``s3://``, ``gs://``), else (HTTP has no
listing) the files a folder is read from by name. Any file without a content id makes the
checkpoint uncacheable (None): its rewrite could not be told from the file cached.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath

from .identity import SIDECARS, Identity

#: Files read from a remote folder by name, where it cannot be listed (HTTP).
NAMED_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
               "model.safetensors", "model.safetensors.index.json", "config.json")
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")


def remote_identity(url, token: str | None = None) -> Identity | None:
    """The identity of the checkpoint at ``url`` (a :class:`~dora_analysis.io.remote.Url`), or
    None when a file of it reports no content id, or the storage cannot be asked."""
    from ..io.remote import content_version, filesystem

    fs, path = filesystem(url, token)
    listable = url.scheme not in ("http", "https")
    try:
        infos = _file_infos(fs, path, url, listable)
    except Exception:  # every backend raises its own types: the run itself will say what
        return None
    versions = []
    for name, info in sorted(infos.items()):
        version = content_version(url / name if name else url, info)
        if version is None:
            return None
        versions.append(version)
    if not versions:
        return None
    digest = hashlib.sha256(json.dumps(versions, default=str).encode()).hexdigest()
    return Identity(digest)


def _file_infos(fs, path: str, url, listable: bool) -> dict[str, dict]:
    """Relative name → fsspec info of every file the checkpoint may be read from."""
    is_file = url.name.endswith(_SUFFIXES)
    if is_file and not url.name.endswith(".index.json"):
        infos = {"": fs.info(path)}
        folder, prefix = path.rsplit("/", 1)[0], "../"
        infos |= {prefix + n: i for n, i in _named(fs, folder, SIDECARS).items()}
        return infos
    folder = path.rsplit("/", 1)[0] if is_file else path.rstrip("/")
    if not listable:
        return _named(fs, folder, NAMED_FILES) | ({"": fs.info(path)} if is_file else {})
    fs.invalidate_cache(folder)  # a run still training rewrites its files: never a stale listing
    found = fs.find(folder, detail=True)
    return {str(PurePosixPath(name).relative_to(PurePosixPath(_bare(folder)))): info
            for name, info in found.items()
            if info.get("type") == "file" and name.endswith(_SUFFIXES)}


def _bare(path: str) -> str:
    """A path as fsspec names what it lists (no scheme)."""
    return path.split("://", 1)[-1]


def _named(fs, folder: str, names: tuple[str, ...]) -> dict[str, dict]:
    infos = {}
    for name in names:
        try:
            infos[name] = fs.info(f"{folder}/{name}")
        except FileNotFoundError:
            continue
    return infos
