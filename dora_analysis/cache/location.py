"""Where dora-analysis keeps what it caches: one folder for the results and the SVD caches."""

from __future__ import annotations

import os
from pathlib import Path

#: The folder's name under ``$XDG_CACHE_HOME`` (``~/.cache``).
CACHE_NAME = "dora-analysis"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/dora-analysis``, or ``~/.cache/dora-analysis`` when the variable is unset
    or empty (the XDG base directory rule).

    Example:
        >>> cache_root().name
        'dora-analysis'
    """
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / CACHE_NAME
