"""What a metric is: one function of a matrix pair, declared with its columns, cost and switch.

A metric module defines one :class:`Metric` and keeps heavy imports (torch, scipy) inside its
function, so that the command line can list every metric's options without loading them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


@dataclass(frozen=True)
class Setting:
    """A parameter of a metric, settable from the library and the command line."""

    name: str
    """Keyword in ``analyze(...)`` and ``--<name with dashes>`` on the command line."""
    default: Any
    help: str
    type: Callable[[str], Any] = float


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

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"metric {self.name}: cost must be one of {', '.join(COSTS)}")

    def enabled(self, config: AnalysisConfig) -> bool:
        return self.option is None or self.option in config.metrics
