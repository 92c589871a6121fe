"""Opening a checkpoint: one :func:`open_checkpoint`, one ordered registry of formats.

A format is a name, a test that recognises a local path, and a function that opens it; the first
format whose test passes wins. Adding a format means one new module under ``io/`` and one entry in
:data:`FORMATS`. Adapter formats need the base they are merged with (``needs_base``); every
source of full weights is wrapped by :func:`~dora_analysis.io.quant.dequantized`, so quantized
weights read as floats or are refused by name.

Readers that need torch (pickles, DCP, DeepSpeed, adapters) are imported when a path of
their format is opened: a safetensors checkpoint, local or remote, is opened without torch.

Example:
    >>> with open_checkpoint("model.safetensors") as src:  # doctest: +SKIP
    ...     w = src.get_tensor(src.keys()[0])
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigError,
    DoraAnalysisError,
)
from .base import TensorSource
from .detect import (
    ADAPTER_WEIGHT_FILES,
    adapter_format,
    find_dcp,
    find_zero,
    has_adapter_weights,
    is_adapter_folder,
)
from .guard import IO_BACKENDS, confined, not_found, not_regular, path_kind, shown
from .quant import dequantized
from .refs import TRAINER_DCP_FOLDERS, CheckpointRef, series_steps, step_of
from .remote import DEFAULT_TIMEOUT, Url, open_remote
from .safetensors import SafetensorsFile
from .sharded import ShardedCheckpoint
from .tied import with_tied_heads

if TYPE_CHECKING:
    from .dcp import DcpCheckpoint

log = logging.getLogger("dora_analysis")


@dataclass(frozen=True)
class ReadOptions:
    """How checkpoints are read (shared by every format; each uses what applies to it)."""

    backend: str = "mmap"
    """Safetensors: ``mmap`` (touched pages count in RSS as page cache) or ``pread``."""
    lora_alpha: float | None = None
    """Adapters that do not store alpha (torchtune): the alpha they were trained with."""
    precision: str = "auto"
    """``auto`` reads the weights as the checkpoint stores them for inference; ``fp32`` asks for
    full-precision master weights where the format keeps them (DeepSpeed ZeRO)."""
    token: str | None = field(default=None, repr=False)
    """Hugging Face token for private repos (default: ``HF_TOKEN``); never printed."""
    adapter_base: str | None = None
    """Adapters: a reference to the base they were trained against when it is not BASE."""
    timeout: float = DEFAULT_TIMEOUT
    """Remote storage: seconds before a connection or a read is given up."""

    def __post_init__(self) -> None:
        if self.backend not in IO_BACKENDS:
            raise ConfigError(f"--io must be one of {', '.join(IO_BACKENDS)}, got {self.backend!r}")


Opener = Callable[[Path, ReadOptions], TensorSource]

def _torch_file(path: Path, options: ReadOptions) -> TensorSource:
    from .torch_bin import TorchFile  # torch only for pickles

    return TorchFile(path)


#: Checkpoint files by suffix.
FILE_SUFFIXES: dict[str, Opener] = {
    ".safetensors": lambda p, o: SafetensorsFile(p, o.backend),
    ".bin": _torch_file,
    ".pt": _torch_file,
    ".pth": _torch_file,
}

#: Files that make a folder a model checkpoint, in order of preference. transformers' weight
#: variants (``save_pretrained(variant="fp16")``) insert ``.<variant>`` before the last suffix:
#: ``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``.
FOLDER_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: A shard index, plain or of a variant: ``<stem>.<format suffix>.index[.<variant>].json``.
_SHARD = re.compile(r"-\d+-of-\d+$")
_INDEX = re.compile(r"^.+?(?P<suffix>\.[A-Za-z0-9]+)\.index(?:\.[\w-]+)?\.json$")


def variant_name(file: str, variant: str) -> str:
    """transformers' name of ``file`` for a weight variant.

    Example:
        >>> variant_name("model.safetensors.index.json", "fp16")
        'model.safetensors.index.fp16.json'
    """
    stem, _, suffix = file.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def folder_variants(path: Path) -> dict[str, Path]:
    """The weight variants a folder holds (``fp16`` → its preferred file), by name."""
    found: dict[str, Path] = {}
    for file in FOLDER_FILES:
        stem, _, suffix = file.rpartition(".")
        for candidate in sorted(path.glob(f"{stem}.*.{suffix}")):
            variant = candidate.name[len(stem) + 1: -len(suffix) - 1]
            if candidate.is_file() and re.fullmatch(r"[\w-]+", variant) \
                    and not _SHARD.search(variant):  # model.fp16-00001-of-00002.safetensors
                found.setdefault(variant, candidate)
    return found


def open_file(path: Path, options: ReadOptions = ReadOptions()) -> TensorSource:
    """One checkpoint file (or a shard index), chosen by suffix; no dequantization."""
    index = _INDEX.match(path.name)
    if index:
        inner = FILE_SUFFIXES.get(index.group("suffix"))
        if inner is not None:
            return ShardedCheckpoint(path, lambda shard: inner(shard, options))
    opener = FILE_SUFFIXES.get(path.suffix)
    if opener is None:
        known = ", ".join(FILE_SUFFIXES)
        raise CheckpointFormatError(f"{path}: unknown checkpoint file type (expected {known})")
    return opener(path, options)


def _model_folder_file(path: Path) -> Path | None:
    """The weights file of a model folder (never a link out of it: see ``guard.confined``)."""
    for file in FOLDER_FILES:
        if (path / file).is_file():
            return confined(path, file, named_by=path)
    variants = folder_variants(path)
    if len(variants) == 1:  # several (fp16 and bf16): the user says which
        return confined(path, next(iter(variants.values())).name, named_by=path)
    singles = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if len(singles) == 1 and not variants:
        return confined(path, singles[0].name, named_by=path)
    return None


def trained_on(options: ReadOptions) -> TensorSource | None:
    """The base adapters were trained against (``options.adapter_base``), opened; or None."""
    if options.adapter_base is None:
        return None
    where, _ = resolve(CheckpointRef.parse(options.adapter_base), options.token)
    return open_checkpoint(where, options)


def _confine_adapter_files(folder: Path) -> None:
    """An adapter folder's files are confined like any checkpoint's (see ``guard.confined``)."""
    for name in ("adapter_config.json", *ADAPTER_WEIGHT_FILES):
        if os.path.lexists(folder / name):
            confined(folder, name, named_by=folder)


def _open_adapter_folder(path: Path, options: ReadOptions, base: TensorSource) -> TensorSource:
    from .adapters import read_peft
    from .merge import AdapterSource

    _confine_adapter_files(path)
    adapter = read_peft(path, adapter_base_given=options.adapter_base is not None)
    return AdapterSource(adapter, base, trained_on=trained_on(options))


def _open_file(path: Path, options: ReadOptions, base: TensorSource | None) -> TensorSource:
    src = open_file(path, options)
    if adapter_format(src.keys()) is None:  # single adapter files: torchtune, LyCORIS/kohya
        return dequantized(src)
    src.close()
    if base is None:
        raise _adapter_as_base(path)
    from .adapters import load_tensors, read_adapter_file
    from .merge import AdapterSource

    adapter = read_adapter_file(path, load_tensors(path), lora_alpha=options.lora_alpha)
    return AdapterSource(adapter, base, trained_on=trained_on(options))


def _gone_meanwhile(path: Path) -> CheckpointNotFoundError:
    """The folder held a checkpoint when its format was told, and no longer does: its files are
    being deleted (a trainer rotating checkpoints away)."""
    return CheckpointNotFoundError(f"{shown(path)}: its weight files went while it was opened "
                                   "(deleted meanwhile?)")


def _open_model_folder(path: Path, options: ReadOptions, base: TensorSource | None
                       ) -> TensorSource:
    file = _model_folder_file(path)
    if file is None:
        raise _gone_meanwhile(path)
    return dequantized(open_file(file, options))


def _open_zero(path: Path, options: ReadOptions, base: TensorSource | None) -> TensorSource:
    if options.precision == "auto" and path.is_dir() and _model_folder_file(path) is not None:
        return _open_model_folder(path, options, base)  # the 16-bit weights Trainer saved beside
    from .deepspeed import open_zero

    return dequantized(open_zero(path, options.precision))


def _open_dcp(path: Path, options: ReadOptions, base: TensorSource | None) -> TensorSource:
    from .dcp import DcpCheckpoint

    folder = find_dcp(path)
    if folder is None:
        raise _gone_meanwhile(path)
    src = DcpCheckpoint(folder, options.backend)
    if not any(".lora_A." in k or ".lora_embedding_A" in k for k in src.keys()):
        return dequantized(src)
    with src:  # HF Trainer + FSDP SHARDED_STATE_DICT saves a PEFT model's adapter only, as DCP
        return _open_dcp_adapter(src, options, base)


def _open_dcp_adapter(src: DcpCheckpoint, options: ReadOptions, base: TensorSource | None
                      ) -> TensorSource:
    """An adapter saved as DCP (accelerate's ``save_fsdp_model(adapter_only=True)``), merged with
    ``base`` through the ``adapter_config.json`` of its checkpoint or of the run folder (Trainer
    writes none into ``checkpoint-N/`` then; the run's final ``save_pretrained`` or a copy does)."""
    folder = next((f for f in dcp_adapter_config_folders(src.path)
                   if (f / "adapter_config.json").is_file()), None)
    if folder is None:
        raise CheckpointFormatError(
            f"{src.path}: holds LoRA adapter factors (lora_A/lora_B) without the "
            "adapter_config.json needed to merge them (an FSDP sharded save of a PEFT model); "
            "copy the run's adapter_config.json into the checkpoint folder or the run folder "
            "(model.peft_config['default'].save_pretrained(folder) writes it)")
    if base is None:
        raise _adapter_as_base(src.path)
    from .adapters import peft_adapter, read_config
    from .merge import AdapterSource

    _confine_adapter_files(folder)
    # accelerate saves {"model": get_peft_model_state_dict(model)}: PEFT's names behind "model."
    tensors = {k.removeprefix("model.") if k.startswith("model.base_model.") else k:
               src.get_tensor(k) for k in src.keys()}
    adapter = peft_adapter(read_config(folder), tensors, folder, src.path,
                           adapter_base_given=options.adapter_base is not None)
    return AdapterSource(adapter, base, trained_on=trained_on(options))


def dcp_adapter_config_folders(dcp: Path) -> list[Path]:
    """Where the config of an adapter saved as DCP may lie, nearest first: the DCP folder, the
    ``checkpoint-N/`` holding it, the run folder holding that."""
    folders = [dcp]
    if dcp.name in TRAINER_DCP_FOLDERS:
        folders.append(dcp.parent)
    if step_of(folders[-1]) is not None:
        folders.append(folders[-1].parent)
    return folders


@dataclass(frozen=True)
class Format:
    """One checkpoint layout: how to recognise a local path, and how to open it."""

    name: str
    detect: Callable[[Path], bool]
    open: Callable[[Path, ReadOptions, TensorSource | None], TensorSource]
    needs_base: bool = False
    """Adapters: read merged with the base, so they cannot be a base themselves."""
    looks_for: str = ""
    """What a folder of this format holds, for the "no checkpoint found" message."""


#: Every format, first match wins.
FORMATS: list[Format] = [
    # a Trainer checkpoint-N/ given the run's adapter_config.json but holding the weights as DCP
    Format("peft-adapter", lambda p: p.is_dir() and is_adapter_folder(p)
           and (has_adapter_weights(p) or find_dcp(p) is None),
           lambda p, o, base: _open_adapter_folder(p, o, base), needs_base=True,
           looks_for="adapter_config.json"),
    Format("file", lambda p: p.is_file(), _open_file),
    # before model folders: a Trainer checkpoint-N holding both reads the fp32 masters on request
    Format("deepspeed-zero", lambda p: find_zero(p) is not None, _open_zero,
           looks_for="global_stepN/ with *_model_states.pt or a 'latest' file (DeepSpeed)"),
    Format("model-folder", lambda p: p.is_dir() and _model_folder_file(p) is not None,
           _open_model_folder, looks_for=", ".join(FOLDER_FILES) + " (or a variant's: "
           "model.fp16.safetensors …), a single *.safetensors"),
    Format("dcp", lambda p: find_dcp(p) is not None, _open_dcp,
           looks_for=".metadata + *.distcp (DCP; also in pytorch_model_fsdp_0/)"),
]


def _adapter_as_base(path: Path) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: is an adapter, not a base model; give the pre-trained "
                                 "weights as BASE and the adapter as TUNED")


def open_checkpoint(path: str | Path | Url, options: ReadOptions = ReadOptions(), *,
                    base: TensorSource | None = None) -> TensorSource:
    """Open a local checkpoint lazily, by the first format in :data:`FORMATS` that fits.

    ``base`` is the source an adapter is merged with; without it, adapters are refused. A
    :class:`~dora_analysis.io.remote.Url` (from :func:`resolve`) is read in place.
    """
    if isinstance(path, Url):
        return open_remote(path, options, base, adapter_base=lambda: trained_on(options))
    path = Path(path)
    kind = path_kind(path)
    if kind is None:
        raise not_found(path)
    if kind == "other":
        raise not_regular(path)
    try:
        for fmt in FORMATS:
            if fmt.detect(path):
                if fmt.needs_base and base is None:
                    raise _adapter_as_base(path)
                source = fmt.open(path, options, base)
                # a base (opened on its own) gets its tied lm_head back as an alias
                return source if base is not None else with_tied_heads(source, path)
        raise _no_checkpoint(path)
    except FileNotFoundError as exc:  # a folder listed or looked into as it was being deleted
        if isinstance(exc, DoraAnalysisError):
            raise
        raise not_found(exc.filename or path) from None


def _no_checkpoint(path: Path) -> CheckpointFormatError:
    """Why a folder holds no checkpoint, and what to give instead."""
    steps = series_steps(path)
    if steps:
        names = ", ".join(p.name for _, p in steps[:3]) + (" …" if len(steps) > 3 else "")
        return CheckpointFormatError(
            f"{path}: a training run folder ({len(steps)} checkpoints: {names}), not one "
            "checkpoint; a run is a series of tuned checkpoints — as BASE give the pre-trained "
            f"weights, or one checkpoint of the run such as {steps[0][1]}")
    variants = folder_variants(path)
    if len(variants) > 1:
        files = ", ".join(p.name for p in variants.values())
        return CheckpointFormatError(
            f"{path}: holds {len(variants)} variants of the weights ({files}); give the one to "
            f"read as a file, e.g. {next(iter(variants.values()))}")
    expected = "; ".join(f.looks_for for f in FORMATS if f.looks_for)
    singles = len([p for p in path.glob("*.safetensors") if p.is_file()])
    found = f"{singles} .safetensors files and no index" if singles else "none of them"
    return CheckpointFormatError(f"{path}: no checkpoint found (looked for {expected}; {found})")


def open_source(path: str | Path, backend: str = "mmap") -> TensorSource:
    """Open full weights (a file or model folder); adapters are refused. For notebooks and tests.

    Example:
        >>> with open_source("model.safetensors") as src:  # doctest: +SKIP
        ...     w = src.get_tensor(src.keys()[0])
    """
    return open_checkpoint(path, ReadOptions(backend=backend))


def resolve(ref: CheckpointRef, token: str | None = None) -> tuple[Path | Url, str]:
    """Where a reference is read from (Hub repos fetched or found in the cache; remote URLs read
    in place) and its printed form."""
    if ref.kind == "remote":
        return Url(ref.url), str(ref)
    if ref.kind != "hub":
        return ref.path, str(ref)
    from . import hub  # only here: huggingface_hub is imported on demand

    snap = hub.snapshot(ref.repo, ref.revision, token=token)
    log.info("%s resolved to commit %s", ref, snap.commit)
    return snap.folder, str(snap)
