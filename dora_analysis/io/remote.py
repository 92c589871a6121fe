"""Remote checkpoints read in place through fsspec: ``hf://``, ``s3://``, ``gs://``, ``https://``.

Nothing is downloaded whole. A safetensors file is one header and one byte range per tensor, and
rows ``a:b`` of a row-major tensor are one contiguous range, so the reader fetches:

1. the header (first 16 KiB, then the rest if it is longer), validated by the one validator of
   local files too (:func:`~dora_analysis.io.safetensors_header.parse_header`: as strict as the
   ``safetensors`` library); once per version of the file in a process (the plan and the run
   both open it), where the storage names the version by its content (ETag, hash, the Hub's
   blob id);
2. only the tensors the analysis selects (``--modules``/``--include``; announced through
   :meth:`~dora_analysis.io.base.TensorSource.will_read`), neighbours coalesced into one request
   of at most :data:`~dora_analysis.io.remote_file.MAX_REQUEST_BYTES` (a gap of unselected bytes
   is merged only when it is small: at most
   :data:`~dora_analysis.io.remote_safetensors.MAX_GAP_BYTES` and a tenth of the request),
   larger tensors in windows of that size, so memory stays bounded whatever the file size.

A folder URL resolves like a local folder: ``adapter_config.json`` (a PEFT adapter, its small
weight file read whole), ``model.safetensors``, ``model.safetensors.index.json`` (shards opened
on first use). PyTorch pickles are read whole only up to :data:`MAX_PICKLE_BYTES`.

Servers must honour HTTP ``Range``: fsspec refuses a non-range answer for any read past byte 0
(and reads only what was asked from byte 0), so a server without range support stops with an
error at the first tensor instead of starting an unbounded download.

Backends: ``hf://`` through huggingface_hub's ``HfFileSystem`` (:func:`dora_analysis.io.hub.
filesystem`; ``HF_ENDPOINT``, ``HF_TOKEN``), ``s3://`` through s3fs (extra ``[s3]``; the usual
``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for S3-compatible stores), ``gs://`` through gcsfs
(extra ``[gcs]``), ``http(s)://`` through fsspec's HTTP filesystem (extra ``[http]``, aiohttp).
Messages never show credentials (:func:`~dora_analysis.io.refs.redact_url`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from ..errors import CheckpointFormatError, CheckpointNotFoundError, SkippedFoldersWarning
from .base import TensorSource
from .detect import ADAPTER_CONFIG, ADAPTER_WEIGHT_FILES, adapter_format
from .formats import FILE_FORMATS, INDEX, REMOTE_FILE_NAME, REMOTE_FOLDER_FILES, format_of
from .options import DEFAULT_TIMEOUT
from .quant import dequantized
from .refs import steps_among, unnumbered
from .remote_file import (
    RemoteFile,
    Url,
    filesystem,
    remote_error,
    retry_policy,
    unreachable,
)
from .remote_safetensors import RemoteSafetensors
from .retry import Exhausted, RetryPolicy, is_timeout, status_of
from .sharded import ShardedCheckpoint

if TYPE_CHECKING:
    import torch

#: Opens the base an adapter was trained against, when the user gave one (else None).
Opened = Callable[[], "TensorSource | None"]
#: Small files read whole (JSON configs, indexes).
MAX_JSON_BYTES = 64 << 20
#: PyTorch pickles cannot be read by range; read whole only up to this size.
MAX_PICKLE_BYTES = 1 << 30


def series_steps(url: Url, token: str | None, timeout: float = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None) -> list[tuple[int, Url]]:
    """The ``checkpoint-N`` / ``step-N`` subfolders of a remote folder as ``(N, url)``, by step;
    empty for a file, a folder without them, or ``http(s)://`` (which has no listing).

    Example:
        >>> series_steps(Url("s3://bucket/run"), None)  # doctest: +SKIP
        [(100, Url('s3://bucket/run/checkpoint-100')), (200, Url('s3://bucket/run/checkpoint-200'))]
    """
    if REMOTE_FILE_NAME.search(url.name) or url.scheme in ("http", "https"):
        return []
    fs, path = filesystem(url, token, timeout)

    def listing(attempt: int) -> list[dict]:
        fs.invalidate_cache(path)  # a run still training gains folders: never a stale listing
        return fs.ls(path, detail=True)

    try:
        entries = (retry or RetryPolicy.resolve()).call(listing)
    except Exception as exc:
        if _absent(url, exc):
            return []
        raise remote_error(url, exc, timeout) from None
    names = sorted(PurePosixPath(str(e["name"]).rstrip("/")).name for e in entries
                   if e.get("type") == "directory")
    skipped = unnumbered(names)
    if skipped:
        warnings.warn(f"{url}: subfolder(s) {', '.join(skipped)} skipped: a step of a series is "
                      "named checkpoint-N or step-N with N a number", SkippedFoldersWarning,
                      stacklevel=2)
    return steps_among(url, ((name, url / name) for name in names))


def exists(url: Url, token: str | None, timeout: float = DEFAULT_TIMEOUT,
           retry: RetryPolicy | None = None) -> bool:
    """Whether ``url`` names a file (``False`` for a 404)."""
    fs, path = filesystem(url, token, timeout)
    try:  # not fs.isfile: it answers False for a server that cannot be reached
        info = (retry or RetryPolicy.resolve()).call(lambda attempt: fs.info(path))
        return info.get("type") == "file"
    except Exception as exc:
        if _absent(url, exc):
            return False
        raise remote_error(url, exc, timeout) from None


def _absent(url: Url, exc: BaseException) -> bool:
    """A genuine "no such file" (HTTP 404), not a server that could not be reached."""
    exc = exc.last if isinstance(exc, Exhausted) else exc
    status = status_of(exc)
    return status == 404 or (status is None and isinstance(exc, FileNotFoundError)
                             and not is_timeout(exc) and unreachable(url, exc) is None)


# --- opening a remote reference ---------------------------------------------------------------

def _read_json(url: Url, token: str | None, timeout: float, retry: RetryPolicy) -> bytes:
    """A small JSON file's bytes, parsed by the same function as a local file's (no decoding
    here: a BOM or invalid UTF-8 gets the same verdict wherever the file lies)."""
    f = RemoteFile(url, token, timeout, retry=retry)
    try:
        return f.read_all(MAX_JSON_BYTES)
    finally:
        f.close()


def _load_tensors(url: Url, token: str | None, timeout: float, retry: RetryPolicy
                  ) -> dict[str, torch.Tensor]:
    """All tensors of a small remote file (an adapter), read whole."""
    import torch

    if url.suffix == ".safetensors":
        with RemoteSafetensors(url, token, timeout, retry=retry) as src:
            src.will_read(src.keys())
            return {n: src.get_tensor(n) for n in src.keys()}
    f = RemoteFile(url, token, timeout, retry=retry)
    try:
        data = f.read_all(MAX_PICKLE_BYTES)
    finally:
        f.close()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointFormatError(f"{url}: not a weights-only PyTorch state dict "
                                    f"({type(exc).__name__}); it is never unpickled") from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{url}: not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _adapter_as_base(url: Url) -> CheckpointFormatError:
    return CheckpointFormatError(f"{url}: is an adapter, not a base model; give the pre-trained "
                                 "weights as BASE and the adapter as TUNED")


def _open_peft(folder: Url, options, base: TensorSource | None, adapter_base: Opened
               ) -> TensorSource:
    if base is None:
        raise _adapter_as_base(folder)
    from .adapter_checkpoint import AdapterCheckpoint
    from .adapters import parse_config, peft_adapter

    token, timeout, retry = options.token, options.timeout, retry_policy(options)
    config = parse_config(_read_json(folder / "adapter_config.json", token, timeout, retry),
                          folder / "adapter_config.json")
    for name in ADAPTER_WEIGHT_FILES:
        weights = folder / name
        if exists(weights, token, timeout, retry):
            tensors = _load_tensors(weights, token, timeout, retry)
            adapter = peft_adapter(config, tensors, folder, weights,
                                   adapter_base_given=options.adapter_base is not None)
            return AdapterCheckpoint(adapter, base, trained_on=adapter_base())
    raise CheckpointFormatError(f"{folder}: adapter folder without weights (expected one of "
                                f"{', '.join(ADAPTER_WEIGHT_FILES)})")


def _open_file(url: Url, options, base: TensorSource | None, adapter_base: Opened
               ) -> TensorSource:
    """A remote file, by its format (:mod:`dora_analysis.io.formats`): read in place where the
    format allows it; otherwise only a small adapter file, read whole."""
    fmt = format_of(url.name)
    if fmt is None:
        readable = [s for f in FILE_FORMATS if f.open_remote for s in f.suffixes]
        expected = ", ".join([*readable, *(f"{s}.index.json" for s in readable)])
        raise CheckpointFormatError(f"{url}: unknown remote checkpoint type (expected "
                                    f"{expected}, or a folder)")
    token, timeout, retry = options.token, options.timeout, retry_policy(options)
    if INDEX.match(url.name) and fmt.open_remote is not None:
        text = _read_json(url, token, timeout, retry)
        return dequantized(ShardedCheckpoint(
            url, lambda shard: fmt.open_remote(shard, options), text=text))
    if fmt.open_remote is not None:
        src = fmt.open_remote(url, options)
        if adapter_format(src.keys()) is None:
            return dequantized(src)
        src.close()
    elif not fmt.whole_adapters or INDEX.match(url.name):
        raise CheckpointFormatError(f"{url}: {fmt.remote_hint}")
    tensors = _load_tensors(url, token, timeout, retry)
    if adapter_format(list(tensors)) is None and fmt.open_remote is None:
        raise CheckpointFormatError(f"{url}: {fmt.remote_hint}")
    if base is None:
        raise _adapter_as_base(url)
    from .adapter_checkpoint import AdapterCheckpoint
    from .adapters import read_adapter_file

    adapter = read_adapter_file(url, tensors, lora_alpha=options.lora_alpha)
    return AdapterCheckpoint(adapter, base, trained_on=adapter_base())


def open_remote(url: Url, options, base: TensorSource | None = None,
                adapter_base: Opened = lambda: None) -> TensorSource:
    """Open a remote file or folder lazily (``options``: a :class:`~dora_analysis.io.open.
    ReadOptions`); an adapter is merged with ``base`` as it is read, or with ``adapter_base()``
    (the base it was trained against) when that is not None.

    Example:
        >>> open_remote(Url("s3://bucket/model.safetensors"), ReadOptions())  # doctest: +SKIP
    """
    if REMOTE_FILE_NAME.search(url.name):
        return _open_file(url, options, base, adapter_base)
    for name in REMOTE_FOLDER_FILES:
        if exists(url / name, options.token, options.timeout, retry_policy(options)):
            if name == ADAPTER_CONFIG:
                return _open_peft(url, options, base, adapter_base)
            return _open_file(url / name, options, base, adapter_base)
    raise CheckpointNotFoundError(
        f"{url}: no checkpoint found (looked for {', '.join(REMOTE_FOLDER_FILES)}); give the "
        "URL of the .safetensors file itself")
