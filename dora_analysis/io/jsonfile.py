"""Small JSON files beside checkpoints (adapter configs, shard indexes), read defensively: any
failure — unreadable, not UTF-8, malformed, nested too deeply, too large, not an object — is one
:class:`~dora_analysis.errors.CheckpointFormatError` that names the file."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointFormatError
from .base import reason
from .guard import shown

#: Larger than any real config or index (a 405B model's index is ~100 KB); stops a runaway read.
MAX_BYTES = 64 << 20


def read_json_object(path: Path, *, what: str, fix: str) -> dict:
    """The JSON object in ``path``; errors read ``<path>: <what> (<why>); <fix>``.

    Example:
        >>> read_json_object(Path("adapter_config.json"), what="broken adapter config",
        ...                  fix="re-save it")  # doctest: +SKIP
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise CheckpointFormatError(f"{shown(path)}: {what} ({reason(exc)}); {fix}") from None
    return parse_json_object(data, path, what=what, fix=fix)


def parse_json_object(data: str | bytes, name: object, *, what: str, fix: str) -> dict:
    """The JSON object in ``data`` (read from ``name``, a path or URL that names it in errors).

    Example:
        >>> parse_json_object(b'{"r": 8}', "adapter_config.json", what="broken", fix="")["r"]
        8
    """
    try:
        if len(data) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES >> 20} MiB")
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
    except RecursionError:
        raise CheckpointFormatError(f"{shown(name)}: {what} (nested too deeply); {fix}") from None
    except ValueError as exc:
        raise CheckpointFormatError(f"{shown(name)}: {what} ({reason(exc)}); {fix}") from None
    return value
