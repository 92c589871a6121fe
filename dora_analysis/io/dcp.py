"""PyTorch Distributed Checkpoint (DCP) folders: ``.metadata`` + ``__R_N.distcp`` files.

Written by ``torch.distributed.checkpoint.save``: FSDP/FSDP2 ``SHARDED_STATE_DICT`` saves of HF
Trainer and accelerate (``checkpoint-N/pytorch_model_fsdp_0/``, names ``model.<fqn>``),
torchtitan (``step-N/``, model names at the top level beside ``optimizer``, ``lr_scheduler``,
``dataloader``, ``train_state``), torchtune and Lightning.

Layout (torch ≥ 2.1): ``.metadata`` is a pickled ``Metadata`` mapping each tensor to its chunks
(``offsets``, ``sizes`` within the global tensor), and each chunk to a byte range of one
``.distcp`` file. That byte range is a whole ``torch.save`` zip whose ``data/0`` entry is stored
uncompressed, so a chunk's rows are one contiguous byte range of the file: rows are read with
mmap or ``pread`` of exactly those bytes, without a process group and without loading shards.
Chunks that cannot be read that way (non-contiguous storage, big-endian) fall back to a
``torch.load(weights_only=True)`` of the one chunk; chunks transformed by a DCP extension
(``transform_descriptors``, e.g. zstd) to ``torch.distributed.checkpoint.load`` of the one tensor.

Safety: ``FileSystemReader.read_metadata`` runs plain ``pickle.load``; here ``.metadata`` goes
through an allowlist unpickler that admits only DCP's own metadata classes, torch dtypes and
sizes, and path objects. Anything else is refused (:class:`UnsafeCheckpointError`), never run.

Example:
    >>> with DcpCheckpoint("run/checkpoint-10/pytorch_model_fsdp_0") as src:  # doctest: +SKIP
    ...     rows = src.get_rows("model.lm_head.weight", 0, 128)
"""

from __future__ import annotations

import io
import math
import mmap
import os
import pathlib
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointFormatError, CheckpointNotFoundError, UnsafeCheckpointError
from .base import TensorInfo, TensorSource, reason
from .detect import METADATA_FILE, find_dcp, is_dcp_folder  # noqa: F401 - re-exported
from .dtypes import name_of
from .guard import GuardedFile, confined, pread_exact

#: Top-level state a training loop saves beside the model (torchtitan, torchtune, Lightning):
#: not weights, so not listed. The model itself is either at the top level or under ``model``.
NON_MODEL_ROOTS = frozenset({
    "optimizer", "optimizers", "optim", "optimizer_states", "lr_scheduler", "lr_schedulers",
    "scheduler", "dataloader", "train_state", "rng", "rng_state", "rng_states", "loops",
    "callbacks", "grad_scaler", "scaler",
})

_DCP = "torch.distributed.checkpoint"
#: ``(module, name)`` globals a DCP ``.metadata`` needs (torch 2.1 - 2.13). Extend only when a
#: real checkpoint shows a new one; each is a plain data class or a lookup by name.
_ALLOWED_GLOBALS = frozenset({
    (f"{_DCP}.metadata", "Metadata"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "MetadataIndex"),
    (f"{_DCP}.metadata", "StorageMeta"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
})
#: ``storage_meta.checkpoint_id`` is pickled as a concrete path class; the pure classes hold the
#: same text and construct on any OS.
_PATH_CLASSES = {"PosixPath": pathlib.PurePosixPath, "WindowsPath": pathlib.PureWindowsPath,
                 "PurePosixPath": pathlib.PurePosixPath,
                 "PureWindowsPath": pathlib.PureWindowsPath}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only; any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:
            return _PATH_CLASSES[name]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def read_metadata(folder: Path):
    """The ``Metadata`` of a DCP folder, unpickled through the allowlist.

    Example:
        >>> md = read_metadata(Path("ckpt"))  # doctest: +SKIP
        >>> sorted(md.state_dict_metadata)[:2]  # doctest: +SKIP
    """
    path = confined(folder, METADATA_FILE, named_by=folder)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        if "is not allowed" in str(exc):
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle: {exc}; a DCP .metadata holds only checkpoint "
                "metadata, this one would run other code. Do not load it with torch"
            ) from None
        raise _unreadable_metadata(path, exc) from None
    except (EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError,
            ImportError, struct.error) as exc:
        raise _unreadable_metadata(path, exc) from None
    if not isinstance(getattr(metadata, "state_dict_metadata", None), dict) or not isinstance(
            getattr(metadata, "storage_data", None), dict):
        raise _unreadable_metadata(path, TypeError(f"holds a {type(metadata).__name__}"))
    return metadata


def _unreadable_metadata(path: Path, exc: BaseException) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: not a readable DCP metadata file ({reason(exc)}); "
                                 "copy the checkpoint folder again")


#: The key under which a wrapper of the training state (PyTorch's DCP recipe: ``{"app":
#: AppState(model, optimizer)}`` whose ``state_dict()`` is ``{"model": …, "optim": …}``) keeps
#: the model.
WRAPPED_MODEL_KEY = "model"


def model_names(metadata) -> dict[str, str]:
    """The model's tensors in a DCP save, as ``our name → fqn in the checkpoint``.

    The save's path of keys to each tensor (``planner_data``) tells the model from the training
    state beside it (:data:`NON_MODEL_ROOTS`, at any level above the tensor). The model is kept
    at the top level (torchtitan), under ``model`` (accelerate, torchtune: ``model.<fqn>``,
    named as stored), or under ``model`` inside one wrapper (the DCP recipe's ``app.model.<fqn>``,
    named ``model.<fqn>`` like accelerate's, so that both align with a base alike).

    Example:
        >>> model_names(read_metadata(Path("app-state")))  # doctest: +SKIP
        {'model.net1.weight': 'app.model.net1.weight', ...}
    """
    planner = getattr(metadata, "planner_data", None) or {}
    names: dict[str, str] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if getattr(entry, "chunks", None) is None:  # BytesStorageMetadata: a pickled value
            continue
        path = planner.get(fqn)
        path = tuple(path) if isinstance(path, (tuple, list)) and path else (fqn.split(".")[0], fqn)
        if any(key in NON_MODEL_ROOTS for key in path[:-1] if isinstance(key, str)):
            continue
        wrapped = len(path) >= 3 and path[1] == WRAPPED_MODEL_KEY
        names[fqn] = (f"{WRAPPED_MODEL_KEY}." + ".".join(str(k) for k in path[2:])
                      if wrapped else fqn)
    ours = list(names.values())
    if len(set(ours)) != len(ours):  # renaming would merge two tensors: keep the stored names
        return {fqn: fqn for fqn in names}
    return {name: fqn for fqn, name in names.items()}


@dataclass(frozen=True)
class _Chunk:
    """One stored piece of a tensor: where it sits in the tensor and in which file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int  # byte offset of the chunk's torch.save zip in ``file``
    length: int
    transformed: bool  # a DCP extension (e.g. zstd) rewrote the bytes

    @property
    def rows(self) -> range:
        return range(self.offsets[0], self.offsets[0] + self.sizes[0])


class _Window(io.RawIOBase):
    """A read-only file object over ``[start, start + length)`` of an open file (``pread``)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature … name length, extra length (30 bytes)


class DcpCheckpoint(TensorSource):
    """A DCP folder, read per tensor and per row block, without a process group.

    ``backend`` is ``mmap`` (the default: chunk rows are views of the mapped ``.distcp`` file)
    or ``pread`` (rows copied into private buffers). Tensors split into several chunks (FSDP
    ``Shard(0)`` row blocks, ``Shard(1)`` column blocks) are assembled for any row range.
    Non-tensor entries and training state beside the model (:data:`NON_MODEL_ROOTS`) are not
    listed.
    """

    def __init__(self, path: str | Path, backend: str = "mmap") -> None:
        self.path = Path(path)
        self._backend = backend
        metadata = read_metadata(self.path)
        self._infos: dict[str, TensorInfo] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._stored = model_names(metadata)  # our name → the fqn in the checkpoint
        for name, fqn in self._stored.items():
            entry = metadata.state_dict_metadata[fqn]
            self._dtypes[name] = entry.properties.dtype
            self._infos[name] = TensorInfo(tuple(int(s) for s in entry.size),
                                           name_of(entry.properties.dtype))
        ours = {fqn: name for name, fqn in self._stored.items()}
        self._chunks: dict[str, list[_Chunk]] = {name: [] for name in self._infos}
        for index, storage in metadata.storage_data.items():
            if index.fqn in ours:
                chunk_md = _chunk_of(metadata.state_dict_metadata[index.fqn].chunks, index)
                self._chunks[ours[index.fqn]].append(_Chunk(
                    tuple(int(o) for o in chunk_md.offsets), tuple(int(s) for s in chunk_md.sizes),
                    str(storage.relative_path), int(storage.offset), int(storage.length),
                    bool(getattr(storage, "transform_descriptors", None))))
        self._check_files()
        self._files: dict[str, GuardedFile] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._layouts: dict[_Chunk, int | None] = {}  # chunk → absolute offset of its rows
        self._whole: tuple[object, torch.Tensor] | None = None  # last read by a fallback

    def _check_files(self) -> None:
        """Every file the metadata names exists and is long enough; chunks cover each tensor."""
        needed: dict[str, int] = {}
        for fqn, chunks in self._chunks.items():
            if sum(math.prod(c.sizes) for c in chunks) != self._infos[fqn].numel:
                raise CheckpointFormatError(
                    f"{self.path / METADATA_FILE}: the chunks of tensor '{fqn}' do not cover its "
                    f"shape {list(self._infos[fqn].shape)}; copy the checkpoint folder again")
            for c in chunks:
                needed[c.file] = max(needed.get(c.file, 0), c.start + c.length)
        for file in needed:  # before anything is looked up: nothing outside is ever touched
            confined(self.path, file, named_by=self.path / METADATA_FILE)
        missing = sorted(f for f in needed if not (self.path / f).is_file())
        if missing:
            raise CheckpointNotFoundError(
                f"{self.path}: {', '.join(missing)} missing (named by {METADATA_FILE}); copy "
                "every .distcp file of the save into the folder")
        for file, end in sorted(needed.items()):
            size = (self.path / file).stat().st_size
            if size < end:
                raise CheckpointFormatError(
                    f"{self.path / file}: {size} bytes, but {METADATA_FILE} places data up to "
                    f"byte {end}: the file is truncated, or {METADATA_FILE} does not match it "
                    "(another save); copy the checkpoint folder again")

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get_tensor(self, name: str) -> torch.Tensor:
        shape = self._infos[name].shape
        if not shape:  # a 0-d tensor has no rows
            return self._read_chunk(name, self._chunks[name][0]).reshape(())
        return self.get_rows(name, 0, shape[0])

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self._infos[name]
        stop = min(stop, info.shape[0])
        if any(c.transformed for c in self._chunks[name]):
            return self._whole_tensor(name)[start:stop]
        out = None
        for chunk in self._chunks[name]:
            lo, hi = max(start, chunk.rows.start), min(stop, chunk.rows.stop)
            if lo >= hi:
                continue
            part = self._chunk_rows(name, chunk, lo - chunk.rows.start, hi - chunk.rows.start)
            if (lo, hi) == (start, stop) and chunk.sizes[1:] == info.shape[1:]:
                return part  # one chunk holds the whole block: no copy
            if out is None:
                out = torch.empty((stop - start, *info.shape[1:]), dtype=self._dtypes[name])
            # (hi - lo, *chunk.sizes[1:]) placed at its rows and column offsets
            index = (slice(lo - start, hi - start),) + tuple(
                slice(o, o + s) for o, s in zip(chunk.offsets[1:], chunk.sizes[1:], strict=True))
            out[index] = part
        if out is None:
            return torch.empty((max(0, stop - start), *info.shape[1:]),
                               dtype=self._dtypes[name])
        return out

    # -- chunks ------------------------------------------------------------------------------

    def _fd(self, file: str) -> int:
        return self._guarded(file).fd

    def _guarded(self, file: str) -> GuardedFile:
        """The ``.distcp`` file, opened through the guard against files that change while read
        (leased for mapping; see :mod:`dora_analysis.io.guard`)."""
        if file not in self._files:
            self._files[file] = GuardedFile(self.path / file, lease=self._backend == "mmap")
        return self._files[file]

    def _mappable(self, file: str) -> bool:
        """Whether rows of ``file`` may come from its mapping now: only under an unbroken lease.
        A writer waiting for the lease makes us drop the mapping first, then let it go."""
        guard = self._guarded(file)
        if guard.leased and guard.lease_broken():
            mapped = self._maps.pop(file, None)
            if mapped is not None:
                try:
                    mapped.close()
                except BufferError:  # only ever viewed inside _chunk_rows, which copies
                    pass
            guard.release()
        return guard.leased

    def _chunk_rows(self, name: str, chunk: _Chunk, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` of one chunk, shape ``(hi - lo, *chunk.sizes[1:])``."""
        dtype = self._dtypes[name]
        data_start = self._layout(name, chunk)
        if data_start is None:
            return self._read_chunk(name, chunk)[lo:hi]
        row_bytes = math.prod(chunk.sizes[1:]) * dtype.itemsize
        size = (hi - lo) * row_bytes
        if size == 0:
            return torch.empty((hi - lo, *chunk.sizes[1:]), dtype=dtype)
        offset = data_start + lo * row_bytes
        guard = self._guarded(chunk.file)
        guard.check()
        if self._backend == "mmap" and self._mappable(chunk.file):
            # copied while the lease holds writers off: a view would be read later, unguarded
            flat = torch.frombuffer(self._map(chunk.file), dtype=dtype, offset=offset,
                                    count=size // dtype.itemsize).clone()
        else:
            try:
                flat = torch.frombuffer(pread_exact(guard.fd, size, offset), dtype=dtype)
            except OSError as exc:
                guard.check()  # the file shrank: say so, by name
                raise CheckpointFormatError(f"{self.path / chunk.file}: cannot read tensor "
                                            f"'{name}' ({exc})") from None
        guard.check()
        return flat.reshape(hi - lo, *chunk.sizes[1:])

    def _map(self, file: str) -> mmap.mmap:
        if file not in self._maps:
            # copy-on-write: a writable view for torch.frombuffer; nothing is ever written back
            self._maps[file] = mmap.mmap(self._fd(file), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def _window(self, chunk: _Chunk) -> _Window:
        return _Window(self._fd(chunk.file), chunk.start, chunk.length)

    def _layout(self, name: str, chunk: _Chunk) -> int | None:
        """Absolute file offset of the chunk's raw row-major data, or None when the chunk must
        be loaded whole (non-contiguous storage, other byte order). Checks the chunk against
        the metadata on first use."""
        if chunk in self._layouts:
            return self._layouts[chunk]
        where = f"{self.path / chunk.file} (tensor '{name}', bytes {chunk.start}+{chunk.length})"
        try:
            meta = torch.load(self._window(chunk), map_location="meta", weights_only=True)
            with zipfile.ZipFile(self._window(chunk)) as archive:
                records = archive.infolist()
                byteorder = next((archive.read(r) for r in records
                                  if r.filename.endswith("/byteorder")), b"little")
        except pickle.UnpicklingError as exc:  # weights_only refused a global: never run
            raise UnsafeCheckpointError(str(self._mismatch(
                where, f"not a plain saved tensor ({_refusal(exc)})"))) from None
        except Exception as exc:  # torch's zip reader raises RuntimeError, zipfile others
            raise self._mismatch(where, f"not a saved tensor ({reason(exc).splitlines()[0]})"
                                 ) from None
        dtype = self._dtypes[name]
        if not torch.is_tensor(meta) or tuple(meta.shape) != chunk.sizes or meta.dtype != dtype:
            held = (f"{list(meta.shape)} {meta.dtype}" if torch.is_tensor(meta)
                    else type(meta).__name__)
            raise self._mismatch(where, f"holds {held}, {METADATA_FILE} says "
                                 f"{list(chunk.sizes)} {dtype}")
        data = [r for r in records if "/data/" in r.filename and "/.data/" not in r.filename]
        nbytes = math.prod(chunk.sizes) * dtype.itemsize
        layout = None
        if (len(data) == 1 and data[0].compress_type == zipfile.ZIP_STORED
                and data[0].file_size == nbytes and meta.is_contiguous()
                and meta.storage_offset() == 0 and byteorder.decode() == sys.byteorder):
            header = os.pread(self._fd(chunk.file), _LOCAL_HEADER.size,
                              chunk.start + data[0].header_offset)
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            if signature == b"PK\x03\x04":
                layout = (chunk.start + data[0].header_offset + _LOCAL_HEADER.size + name_len
                          + extra_len)
        self._layouts[chunk] = layout
        return layout

    def _mismatch(self, where: str, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(
            f"{where}: {what}; {METADATA_FILE} does not match the .distcp files (from another "
            "save, truncated or altered): copy the checkpoint folder again")

    def _read_chunk(self, name: str, chunk: _Chunk) -> torch.Tensor:
        """The whole chunk via ``torch.load(weights_only=True)`` (the fallback path)."""
        if chunk.transformed:
            return self._whole_tensor(name)
        if self._whole is not None and self._whole[0] == (name, chunk):
            return self._whole[1]
        self._layout(name, chunk)  # checks shape and dtype against the metadata
        tensor = torch.load(self._window(chunk), map_location="cpu", weights_only=True)
        self._whole = ((name, chunk), tensor)
        return tensor

    def _whole_tensor(self, name: str) -> torch.Tensor:
        """One tensor through ``torch.distributed.checkpoint.load`` (chunks that a DCP
        extension transformed), with the allowlisted metadata reader. Kept until the next."""
        if self._whole is not None and self._whole[0] == name:
            return self._whole[1]
        import torch.distributed.checkpoint as dcp

        info = self._infos[name]
        fqn = self._stored[name]
        target = {fqn: torch.empty(info.shape, dtype=self._dtypes[name])}
        try:
            dcp.load(target, storage_reader=_safe_reader(self.path), no_dist=True)
        except Exception as exc:  # extension or I/O failures surface as several types
            raise CheckpointFormatError(f"{self.path}: cannot read tensor '{name}' "
                                        f"({reason(exc).splitlines()[0]})") from None
        self._whole = (name, target[fqn])
        return target[fqn]

    def close(self) -> None:
        self._whole = None
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it; the map closes when that is freed
                pass
        self._maps.clear()
        for guard in self._files.values():
            guard.close()
        self._files.clear()


def _refusal(exc: BaseException) -> str:
    """The line of a ``weights_only`` refusal that names the global, if any."""
    lines = str(exc).splitlines()
    return next((line.strip() for line in lines if "GLOBAL" in line),
                "torch.load(weights_only=True) refused it")


def _chunk_of(chunks: list, index):
    """The chunk a ``MetadataIndex`` names: by its index hint if that agrees, else by offset."""
    hint = index.index
    if hint is not None and hint < len(chunks) and chunks[hint].offsets == index.offset:
        return chunks[hint]
    for chunk in chunks:
        if chunk.offsets == index.offset:
            return chunk
    raise CheckpointFormatError(f"{METADATA_FILE}: tensor '{index.fqn}' has no chunk at offsets "
                                f"{list(index.offset)}; copy the checkpoint folder again")


def _safe_reader(path: Path):
    """DCP's own ``FileSystemReader``, with ``.metadata`` read through the allowlist."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(Path(self.path))
            metadata.storage_meta = StorageMeta(load_id=self.load_id)
            return metadata

    return SafeReader(str(path))
