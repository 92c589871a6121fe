"""Paths and URLs as messages may print them (imported by every reader; imports nothing of ours)."""

from __future__ import annotations

import os


def shown(path: object) -> str:
    """A path (or URL) as it may be printed: bytes that are not UTF-8 become ``\\xNN`` escapes.

    Example:
        >>> shown(os.fsdecode(b"tuned\\xff.safetensors"))
        'tuned\\\\xff.safetensors'
    """
    text = path if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return os.fsencode(text).decode("utf-8", "backslashreplace")
