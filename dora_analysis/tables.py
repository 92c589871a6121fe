"""Reading analysis tables back (CSV, JSON records, Parquet), as written by
:func:`dora_analysis.report.write_table`, by ``dora-analyze -o`` or by the training callback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO

import pandas as pd

from . import columns as C
from .errors import TableFormatError
from .io.base import reason
from .io.guard import shown

#: Table formats by file suffix: adding one means adding a line here (and a writer in report.py).
TABLE_READERS: dict[str, Callable] = {
    ".csv": pd.read_csv,
    ".json": lambda src: pd.read_json(src, orient="records"),
    ".parquet": pd.read_parquet,
}
#: Columns without which a file is not an analysis table.
REQUIRED_COLUMNS = (C.CHECKPOINT, C.MODULE, C.DELTA_M, C.DELTA_D)


def read_table(source: str | Path | IO[bytes], *, name: str | None = None) -> pd.DataFrame:
    """Read a table written by :func:`~dora_analysis.report.write_table` back.

    ``source`` is a path or an open binary file; ``name`` gives the file name (and so the
    format) of the latter. Unreadable files (truncated, half-written, not a table) raise
    :class:`~dora_analysis.errors.TableFormatError` naming the file.

    Example:
        >>> table = read_table("deltas.parquet")  # doctest: +SKIP
    """
    name = shown(name or str(source))
    suffix = Path(name).suffix.lower()
    if suffix not in TABLE_READERS:
        raise TableFormatError(f"{name}: not a table (use {', '.join(TABLE_READERS)})")
    try:
        frame = TABLE_READERS[suffix](source)
    except (OSError, ValueError, RecursionError) as exc:  # pyarrow's and pandas' errors included
        raise TableFormatError(f"{name}: cannot read the table ({reason(exc).splitlines()[0]})"
                               ) from None
    missing = sorted(set(REQUIRED_COLUMNS) - set(frame.columns))
    if missing:
        raise TableFormatError(f"{name}: not a dora-analysis table (no column "
                               f"{', '.join(missing)})")
    for col in (C.STEP, C.LAYER):
        if col in frame:
            try:
                frame[col] = frame[col].astype("Int64")
            except (TypeError, ValueError):
                raise TableFormatError(f"{name}: column '{col}' holds values that are not whole "
                                       "numbers") from None
    return frame
