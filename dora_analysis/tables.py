"""Reading analysis tables back (CSV, JSON records, Parquet), as written by
:func:`dora_analysis.report.write_table`, by ``dora-analyze -o`` or by the training callback.

Every table reads back exactly as written: the dtype of each known column comes from the one
schema (:data:`dora_analysis.columns.TABLE_DTYPES` and the metric registry), not from guessing,
so a checkpoint labelled ``NA``, ``NaN``, ``None`` or ``null`` stays a label, and integers with
missing values stay ``Int64``. Numbers are parsed by Python's own correctly rounded parser (every
float to the last bit). The formats' limits: in CSV a missing text value and an empty one are
both an empty field (read as the empty string; the tables the product writes have no missing
text); a JSON table of no rows has no columns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from . import columns as C
from .errors import TableFormatError
from .io.base import reason
from .io.guard import shown

#: Non-finite floats in JSON tables, which JSON has no numbers for (NaN is ``null``).
JSON_INFINITIES = {"Infinity": math.inf, "-Infinity": -math.inf}


def table_dtypes(kind: str = "analysis") -> dict[str, str]:
    """Column → pandas dtype, for every column a table of ``kind`` can have: ``analysis``
    (contract and metrics) or ``cross_run`` (:func:`dora_analysis.compare_runs`).

    Example:
        >>> table_dtypes()["energy_rank_90"], table_dtypes()["checkpoint"]
        ('Int64', 'str')
        >>> table_dtypes("cross_run")["subspace_k"]
        'int64'
    """
    if kind == "cross_run":
        return dict(C.CROSS_RUN_DTYPES)
    from .metrics import metric_columns

    return C.TABLE_DTYPES | {c.name: c.dtype for c in metric_columns()}


def _read_csv(source, dtypes: dict[str, str]) -> pd.DataFrame:
    # every field as the text it is ("NA" too); the schema then says what each column holds
    text = pd.read_csv(source, dtype=str, keep_default_na=False, na_filter=False)
    return pd.DataFrame({col: _typed(text[col].tolist(), dtypes.get(col), col, _csv_value)
                         for col in text.columns}, index=text.index)


def _read_json(source, dtypes: dict[str, str]) -> pd.DataFrame:
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            records = json.load(f)
    else:
        records = json.load(source)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("not a list of records")
    columns = list(dict.fromkeys(k for r in records for k in r))
    return pd.DataFrame({col: _typed([r.get(col) for r in records], dtypes.get(col), col,
                                     _json_value)
                         for col in columns}, index=pd.RangeIndex(len(records)))


def _csv_value(value: str, dtype: str) -> object:
    if dtype in ("str", "string"):
        return value
    return None if value == "" else value


def _json_value(value: object, dtype: str) -> object:
    if dtype == "float64" and isinstance(value, str):
        return JSON_INFINITIES.get(value, value)
    return value


def _typed(values: list, dtype: str | None, column: str,
           decode: Callable[[object, str], object]) -> pd.Series:
    """A column's values (text from CSV, JSON values) as its schema's ``dtype``, exactly; a
    column the schema does not know (``dtype`` None) is read as numbers where every value is
    one, else as text."""
    if dtype is None:
        return _inferred(values, decode)
    values = [decode(v, dtype) for v in values]
    try:
        if dtype == "float64":  # float() of each text: correctly rounded, every last bit
            return pd.Series(np.array([math.nan if v is None else v for v in values],
                                      dtype=object).astype(np.float64), dtype="float64")
        if dtype in ("int64", "Int64"):
            ints = [None if v is None else _whole(v) for v in values]
            if dtype == "int64" and None in ints:
                raise ValueError("a missing value")
            return pd.Series(pd.array(ints, dtype="Int64")).astype(dtype)
        return pd.Series(values, dtype=object).astype(dtype)
    except (TypeError, ValueError, OverflowError):
        raise TableFormatError(f"column '{column}' holds values that are not "
                               + ("whole numbers" if "nt" in dtype else f"of type {dtype}")
                               ) from None


def _whole(value: object) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


def _inferred(values: list, decode: Callable[[object, str], object]) -> pd.Series:
    numbers = [decode(v, "float64") for v in values]
    numbers = [None if v in ("", None) else v for v in numbers]
    try:
        if all(v is None or isinstance(v, int) and not isinstance(v, bool)
               or isinstance(v, str) and v.lstrip("-").isdigit() for v in numbers):
            ints = [None if v is None else int(v) for v in numbers]
            return pd.Series(pd.array(ints, dtype="Int64")).astype(
                "int64" if None not in ints or not ints else "Int64")
        floats = np.array([math.nan if v is None else v for v in numbers], dtype=object)
        return pd.Series(floats.astype(np.float64), dtype="float64")
    except (TypeError, ValueError, OverflowError):
        return pd.Series(values)


#: Table formats by file suffix: adding one means adding a line here (and a writer in report.py).
TABLE_READERS: dict[str, Callable] = {
    ".csv": _read_csv,
    ".json": _read_json,
    ".parquet": lambda source, dtypes: pd.read_parquet(source),
}
#: Columns without which a file is not an analysis table.
REQUIRED_COLUMNS = (C.CHECKPOINT, C.MODULE, C.DELTA_M, C.DELTA_D)
#: Columns without which a file is not a cross-run table (:func:`dora_analysis.compare_runs`).
CROSS_RUN_REQUIRED = (C.RUN_A, C.RUN_B, C.NAME, C.MODULE)


def read_table(source: str | Path | IO[bytes], *, name: str | None = None,
               kind: str = "analysis") -> pd.DataFrame:
    """Read a table written by :func:`~dora_analysis.report.write_table` back, exactly.

    ``source`` is a path or an open binary file; ``name`` gives the file name (and so the
    format) of the latter. ``kind`` is ``analysis`` (the per-matrix table) or ``cross_run``
    (:func:`~dora_analysis.compare_runs`'s). Unreadable files (truncated, half-written, not a
    table of that kind) raise :class:`~dora_analysis.errors.TableFormatError` naming the file.

    Example:
        >>> table = read_table("deltas.parquet")  # doctest: +SKIP
    """
    if kind not in TABLE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TABLE_KINDS)}, got {kind!r}")
    required, what = TABLE_KINDS[kind]
    name = shown(name or str(source))
    suffix = Path(name).suffix.lower()
    if suffix not in TABLE_READERS:
        raise TableFormatError(f"{name}: not a table (use {', '.join(TABLE_READERS)})")
    try:
        frame = TABLE_READERS[suffix](source, table_dtypes(kind))
    except TableFormatError as exc:
        raise TableFormatError(f"{name}: {exc}") from None
    except (OSError, ValueError, RecursionError) as exc:  # pyarrow's and pandas' errors included
        raise TableFormatError(f"{name}: cannot read the table ({reason(exc).splitlines()[0]})"
                               ) from None
    missing = sorted(set(required) - set(frame.columns))
    if missing:
        raise TableFormatError(f"{name}: not a {what} (no column {', '.join(missing)})")
    return frame


#: What :func:`read_table` can read: kind → (required columns, what the error calls it).
TABLE_KINDS: dict[str, tuple[tuple[str, ...], str]] = {
    "analysis": (REQUIRED_COLUMNS, "dora-analysis table"),
    "cross_run": (CROSS_RUN_REQUIRED, "cross-run table (dora-analyze --cross-run)"),
}
