"""What a metric is: one function of a matrix pair, declared with its columns, cost and switch.

A metric module defines one :class:`Metric` and keeps heavy imports (torch, scipy) inside its
function, so that the command line can list every metric's options without loading them.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import AnalysisConfig
    from ..pairs import PairView

#: How expensive a metric is, from cheapest to dearest (shown in ``--help`` and the docs).
COSTS: dict[str, str] = {
    "stream": "from the one streaming pass (no extra reads)",
    "dense": "holds both matrices in memory as float64",
    "svd": "float64 spectral decompositions of Gram matrices, certified, else dense SVDs "
           "(O(out·in·min(out, in)))",
}


@dataclass(frozen=True)
class Column:
    """One output column of a metric."""

    name: str
    dtype: str
    """pandas dtype of the column: ``float64``, ``int64``, ``Int64`` (nullable) or ``string``."""
    description: str
    log_scale: bool = False
    """Values span orders of magnitude: figures plot them on a log axis."""


#: Defaults of the cross-run table (:func:`dora_analysis.compare_runs`, ``--cross-run-k``,
#: ``--cross-run-trim``): subspaces of the top 16 singular vectors; TIES' kept share, 20 %.
CROSS_RUN_K = 16
CROSS_RUN_TRIM = 0.2


def positive_int(value: Any) -> int:
    """Check of a count (``--intruder-k``, ``--amplification-rank``): a whole number ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError("must be a positive whole number")
    return int(value)


def fraction(value: Any) -> float:
    """Check of a threshold in (0, 1] (``--intruder-eps``); NaN and booleans are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError("must be a number in (0, 1]")
    return float(value)


def optional_folder(value: Any) -> str | None:
    """Check of a folder setting: a path, ``'none'`` or None (the setting's own default)."""
    if value is not None and not isinstance(value, str | os.PathLike):
        raise ValueError("must be a folder path or 'none'")
    return None if value is None else os.fspath(value)


def any_number(value: Any) -> float:
    """Check of an unbounded real setting: any finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError("must be a finite number")
    return float(value)


@dataclass(frozen=True)
class Setting:
    """A parameter of a metric, settable from the library and the command line."""

    name: str
    """Keyword in ``analyze(...)`` and ``--<name with dashes>`` on the command line."""
    default: Any
    help: str
    type: Callable[[str], Any] = float
    """Parses the command line's text (argparse's ``type``)."""
    check: Callable[[Any], Any] = field(kw_only=True)
    """The valid values: returns the value normalised, or raises ``ValueError`` saying what it
    must be (``"must be a positive whole number"``); applied to library and command-line values
    alike by :class:`~dora_analysis.config.AnalysisConfig`, before any work."""

    def __post_init__(self) -> None:
        self.check(self.default)  # a declaration whose default is out of range fails at import

    @property
    def flag(self) -> str:
        """The command-line option: ``--intruder-k`` for ``intruder_k``."""
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> Any:
        """``value`` checked and normalised; :class:`ConfigError` naming the flag otherwise.

        Example:
            >>> Setting("k", 10, "top k", type=int, check=positive_int).validate(0)
            Traceback (most recent call last):
            ...
            dora_analysis.errors.ConfigError: --k must be a positive whole number, got 0
        """
        try:
            return self.check(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.flag} {exc}, got {value!r}") from None


@dataclass(frozen=True)
class Metric:
    """One analysis of a matrix pair: a function plus what the table, CLI and figures need."""

    name: str
    description: str
    columns: tuple[Column, ...]
    compute: Callable[[PairView], dict[str, Any]]
    """Maps a :class:`~dora_analysis.pairs.PairView` to a value per column."""
    option: str | None = None
    """The switch that turns the metric on (``spectrum`` → ``--spectrum``,
    ``analyze(spectrum=True)``); None: always computed."""
    per_axis: bool = True
    """One value per axis row (like ΔM, ΔD); False: one per matrix, repeated on each axis row."""
    cost: str = "stream"
    settings: tuple[Setting, ...] = ()
    requires: Callable[[], None] | None = None
    """Checks, before any work, that what the metric needs is installed: raises
    :class:`ConfigError` naming the extra to install (``--weightwatcher``: ``[ww]``)."""

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"metric {self.name}: cost must be one of {', '.join(COSTS)}")

    def enabled(self, config: AnalysisConfig) -> bool:
        return self.option is None or self.option in config.metrics
