"""The weight-file formats, in one table: each says once which files it reads (suffixes, the
files that make a folder a checkpoint of it) and how it opens them, locally and on remote
storage. Everything else derives from :data:`FILE_FORMATS`:

* :func:`~dora_analysis.io.open.open_checkpoint`: a file by its suffix, a shard index by the
  suffix inside its name, a model folder by :data:`FOLDER_FILES`;
* :func:`~dora_analysis.io.remote.open_remote`: :data:`REMOTE_FILE_NAME`,
  :data:`REMOTE_FOLDER_FILES` and each format's ``open_remote``;
* the Hub's choice of files to fetch (:data:`HUB_WEIGHT_CHOICES`);
* the dashboard's accepted files (:data:`CHECKPOINT_SUFFIXES`).

Folder layouts that are not one file format (PEFT adapter folders, DeepSpeed ZeRO, DCP) are
recognised by :data:`dora_analysis.io.open.FORMATS`, which opens their weights through this
table. Adding a format: one module under ``io/`` and one :class:`FileFormat` entry here.

Openers import their reader when called: a safetensors checkpoint is opened without torch, a
GGUF one without torch either (the ``gguf`` library reads it with numpy).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .detect import ADAPTER_CONFIG, ADAPTER_WEIGHT_FILES, DCP_SUFFIX

if TYPE_CHECKING:
    from .base import TensorSource
    from .options import ReadOptions
    from .remote_file import Url

#: Opens a local file: (path, options, the base it is compared with or None).
LocalOpener = Callable[["Path", "ReadOptions", "TensorSource | None"], "TensorSource"]
#: Opens a remote file read in place: (url, options).
RemoteOpener = Callable[["Url", "ReadOptions"], "TensorSource"]


@dataclass(frozen=True)
class FileFormat:
    """One weight-file format."""

    name: str
    suffixes: tuple[str, ...]
    """File name suffixes it reads (``.safetensors``); a shard index ``<stem><suffix>.index.json``
    lists files of the format."""
    open: LocalOpener
    folder_files: tuple[str, ...] = ()
    """Files that make a folder a model checkpoint of this format, preferred first."""
    open_remote: RemoteOpener | None = None
    """Read in place on remote storage by byte ranges; None: only small adapter files are read
    remotely, whole (see :func:`~dora_analysis.io.remote.open_remote`)."""
    whole_adapters: bool = False
    """Remote: a small adapter file of this format is read whole (its tensors all at once)."""
    remote_hint: str = ""
    """Why the format is not read remotely, and what to do, when ``open_remote`` is None."""
    hub_files: tuple[str, ...] = ()
    """Glob patterns the Hub download may fetch when a repository holds no index (best first)."""


def _safetensors(path: Path, options: ReadOptions, base: TensorSource | None) -> TensorSource:
    from .safetensors import SafetensorsFile

    return SafetensorsFile(path, options.backend)


def _remote_safetensors(url: Url, options: ReadOptions) -> TensorSource:
    from .remote_file import retry_policy
    from .remote_safetensors import RemoteSafetensors

    return RemoteSafetensors(url, options.token, options.timeout, retry=retry_policy(options))


def _torch_pickle(path: Path, options: ReadOptions, base: TensorSource | None) -> TensorSource:
    from .torch_bin import TorchFile  # torch only for pickles

    return TorchFile(path)


def _gguf(path: Path, options: ReadOptions, base: TensorSource | None) -> TensorSource:
    from .gguf_file import GgufFile

    return GgufFile(path, names_like=base.keys() if base is not None else ())


#: Every weight-file format; a folder holding several is read as the first one's.
FILE_FORMATS: tuple[FileFormat, ...] = (
    FileFormat("safetensors", (".safetensors",), _safetensors,
               folder_files=("model.safetensors", "model.safetensors.index.json"),
               open_remote=_remote_safetensors,
               hub_files=("model.safetensors", "*.safetensors")),
    FileFormat("pytorch", (".bin", ".pt", ".pth"), _torch_pickle,
               folder_files=("pytorch_model.bin", "pytorch_model.bin.index.json"),
               whole_adapters=True,
               remote_hint="PyTorch pickles cannot be read in place (no ranges); download the "
                           "file, or convert it to safetensors",
               hub_files=("pytorch_model.bin",)),
    FileFormat("gguf", (".gguf",), _gguf,
               remote_hint="GGUF files are read memory-mapped by the gguf library, not in place "
                           "on remote storage; download the file and give its local path"),
)

#: Each suffix's format.
SUFFIXES: dict[str, FileFormat] = {s: f for f in FILE_FORMATS for s in f.suffixes}
#: Files that make a folder a model checkpoint, in order of preference.
FOLDER_FILES: tuple[str, ...] = tuple(n for f in FILE_FORMATS for n in f.folder_files)
#: Files that make a remote folder a checkpoint, in order of preference.
REMOTE_FOLDER_FILES: tuple[str, ...] = (ADAPTER_CONFIG, *(
    n for f in FILE_FORMATS if f.open_remote is not None for n in f.folder_files))
#: A remote URL that names a file rather than a folder.
REMOTE_FILE_NAME = re.compile(
    r"(" + "|".join(re.escape(s) for s in (*SUFFIXES, ".json")) + r")$")
#: What the Hub download fetches after the JSON files, by what they reveal; first match wins
#: (an index: the shards it names).
HUB_WEIGHT_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (ADAPTER_CONFIG, tuple(n for n in ADAPTER_WEIGHT_FILES if n.endswith((".safetensors",
                                                                            ".bin")))),
    *((n, ()) for n in FOLDER_FILES if n.endswith(".index.json")),
    ("", tuple(dict.fromkeys(
        [n for n in FOLDER_FILES if not n.endswith(".index.json")]
        + [p for f in FILE_FORMATS for p in f.hub_files]))),
)
#: Suffixes of the files a checkpoint may be read from (weights, indexes and configs, DCP
#: data): what the dashboard accepts and watches.
CHECKPOINT_SUFFIXES: tuple[str, ...] = (*SUFFIXES, ".json", DCP_SUFFIX)


def format_of(name: str) -> FileFormat | None:
    """The format of a file name: by its suffix, or a shard index's by the suffix it lists.

    Example:
        >>> format_of("model.safetensors.index.json").name, format_of("m.Q8_0.gguf").name
        ('safetensors', 'gguf')
    """
    index = INDEX.match(name)
    return SUFFIXES.get(index.group("suffix") if index else "." + name.rsplit(".", 1)[-1]
                        if "." in name else "")


#: A shard index, plain or of a variant: ``<stem>.<format suffix>.index[.<variant>].json``.
INDEX = re.compile(r"^.+?(?P<suffix>\.[A-Za-z0-9]+)\.index(?:\.[\w-]+)?\.json$")
