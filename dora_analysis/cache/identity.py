"""What a checkpoint *is*, for the results cache: the identity of every file it is read from.

A cached result may be served only for the very bytes it was computed from, so the identity must
change whenever a file the readers open does:

* **Local files**: path, size, modification and change time (ns), device and inode, and a digest
  of the content — all of it for files up to :data:`FULL_DIGEST_BYTES`, else the first and last
  :data:`SAMPLE_BYTES` and :data:`SAMPLES` evenly spaced samples. ``touch`` changes the times, a
  rename puts another inode in place, and restoring the modification time afterwards
  (``os.utime``, ``cp -p``, ``rsync -t``) still moves the change time, which no user can set. The
  digest is for what stat cannot see: a file rewritten with the same size within one tick of the
  file system's clock (a few ms: only small files can be rewritten that fast, and those are
  digested whole).
* **Remote files**: the storage's own content id — ETag, hash or the Hub's blob id
  (:func:`dora_analysis.io.remote.content_version`) — and size. A file without one cannot be
  told apart from a rewrite: the checkpoint is not cached (None).

A checkpoint's files are those its readers may open: every weight, index, config, DCP and
DeepSpeed file under its folder (a trainer's optimizer, scheduler and RNG files excluded: never
read), and the ``config.json`` / ``adapter_config.json`` of the two folders above it (a base's
tied embeddings, a run folder's adapter config for DCP adapter checkpoints; for a file, its own
folder and the one above).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..io.detect import ADAPTER_WEIGHT_FILES
from ..io.formats import CHECKPOINT_SUFFIXES, REMOTE_FILE_NAME, REMOTE_FOLDER_FILES

#: Files of a checkpoint folder that a reader may open, by suffix and by name.
READ_SUFFIXES = CHECKPOINT_SUFFIXES  # the format table's
READ_NAMES = (".metadata", "latest")
#: What a trainer saves beside the weights; the analysis never reads it.
TRAINER_FILES = frozenset({"optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin",
                           "trainer_state.json"})
#: Files read from the folders above a checkpoint, and how many folders up.
SIDECARS = ("config.json", "adapter_config.json")
SIDECAR_LEVELS = 2
#: Files up to this size are digested whole; larger ones by samples.
FULL_DIGEST_BYTES = 16 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 16


@dataclass(frozen=True)
class FileStamp:
    """What ``stat`` says of one local file; any change means another file or another content."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int


def file_stamp(path: str | os.PathLike) -> FileStamp | None:
    """The stamp of a regular file, or None when there is none there (or it is not regular)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileStamp(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                     st.st_ino, st.st_dev)


def content_digest(path: str | os.PathLike, size: int) -> str:
    """SHA-256 of the whole file up to :data:`FULL_DIGEST_BYTES`, else of its first and last
    :data:`SAMPLE_BYTES` and :data:`SAMPLES` evenly spaced samples (about 1 MiB read)."""
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if size <= FULL_DIGEST_BYTES:
            offsets = range(0, size, 1 << 20)
            length = 1 << 20
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLES + 1)
            offsets = [0, *(step * i for i in range(1, SAMPLES + 1)), size - SAMPLE_BYTES]
            length = SAMPLE_BYTES
        for offset in offsets:
            digest.update(os.pread(fd, length, offset))
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_by_readers(path: Path) -> bool:
    """Whether a reader may open this file of a checkpoint folder."""
    name = path.name
    if name in TRAINER_FILES or name.startswith("rng_state"):
        return False
    return name.endswith(READ_SUFFIXES) or name in READ_NAMES


def checkpoint_files(path: Path) -> list[Path]:
    """Every local file the readers of checkpoint ``path`` may open (see the module notes)."""
    if path.is_file():
        files = [path]
        if path.name.endswith(".index.json"):  # its shards are its siblings
            files += [p for p in path.parent.iterdir() if p != path and read_by_readers(p)]
    else:
        files = [p for p in path.rglob("*") if read_by_readers(p)]
    above = [path.parent]  # a file's own folder, or the folder holding the checkpoint folder
    while len(above) < SIDECAR_LEVELS:
        above.append(above[-1].parent)
    files += [folder / name for folder in above for name in SIDECARS]
    return sorted(set(files))


@dataclass(frozen=True)
class Identity:
    """One checkpoint's identity: a digest of every file, and the local files' stamps (checked
    again before a result computed from them is stored)."""

    digest: str
    stamps: tuple[FileStamp, ...] = ()

    def unchanged(self) -> bool:
        """Whether every local file still has the stamp it had (stat only: cheap)."""
        return all(file_stamp(s.path) == s for s in self.stamps)


def _digest(parts: Iterable[Any]) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()


def local_identity(path: Path) -> Identity:
    """The identity of a local checkpoint file or folder."""
    stamps, parts = [], []
    for file in checkpoint_files(path):
        stamp = file_stamp(file)
        if stamp is None:  # a sidecar that is not there (or vanished meanwhile)
            continue
        stamps.append(stamp)
        parts.append([*dataclasses.astuple(stamp), content_digest(file, stamp.size)])
    return Identity(_digest(parts), tuple(stamps))


def checkpoint_identity(path: Any, token: str | None = None) -> Identity | None:
    """The identity of a checkpoint as the plan resolved it (a local path, or a remote
    :class:`~dora_analysis.io.remote.Url`); None when it cannot be told (a remote file whose
    storage reports no content id, a file that cannot be read)."""
    try:
        if isinstance(path, (str, os.PathLike)):
            return local_identity(Path(path))
        return remote_identity(path, token)
    except (OSError, ValueError):
        return None


# The identity of a remote checkpoint (``hf://``, ``s3://``, ``gs://``, ``https://``): each
# file's content id as the storage reports it (ETag, hash, the Hub's blob id) and its size.
#: Files read from a remote folder by name, where it cannot be listed (HTTP).
NAMED_FILES = tuple(dict.fromkeys((*REMOTE_FOLDER_FILES, *ADAPTER_WEIGHT_FILES, "config.json")))


def _remote_file(name: str) -> bool:
    return REMOTE_FILE_NAME.search(name) is not None


def remote_identity(url, token: str | None = None) -> Identity | None:
    """The identity of the checkpoint at ``url`` (a :class:`~dora_analysis.io.remote.Url`), or
    None when a file of it reports no content id, or the storage cannot be asked."""
    from ..io.remote_file import content_version, filesystem  # fsspec only for remote checkpoints

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
    is_file = _remote_file(url.name)
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
            if info.get("type") == "file" and _remote_file(name)}


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
