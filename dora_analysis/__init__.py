"""dora-analysis: how fine-tuning moves a model's weights, in magnitude and direction.

Follows Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (ICML 2024), §3.2: every
weight matrix is split into a magnitude (one norm per output channel) and a direction; ΔM and ΔD
(Eqs. 3-4) are measured per layer and training step, and their correlation separates full
fine-tuning and DoRA (negative) from LoRA (positive).

The public names are imported on first use, so ``import dora_analysis`` (and ``dora-analyze
--help``) stays fast and does not load torch or pandas until they are needed.

Example:
    >>> import dora_analysis as da
    >>> table = da.analyze("pre.safetensors", "tuned.safetensors")  # doctest: +SKIP
    >>> da.correlate(table)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

# typing.TYPE_CHECKING without importing typing (tens of ms at every start, during which a
# Ctrl-C would print a traceback); type checkers treat any TYPE_CHECKING name as true.
TYPE_CHECKING = False

__version__ = "0.1.0"

#: Public name → the module that defines it.
_EXPORTS: dict[str, str] = {
    "AnalysisConfig": "config",
    "DoraAnalysisError": "errors",
    "analyze": "analysis",
    "analyze_model": "live",
    "compare": "decompose",
    "compare_runs": "crossrun",
    "correlate": "stats",
    "delta_direction": "decompose",
    "delta_magnitude": "decompose",
    "direction": "decompose",
    "magnitude": "decompose",
    "matrix_detail": "drilldown",
    "read_table": "tables",
    "write_html": "report",
    "write_table": "report",
}

__all__ = [
    "AnalysisConfig",
    "DoraAnalysisError",
    "analyze",
    "analyze_model",
    "compare",
    "compare_runs",
    "correlate",
    "delta_direction",
    "delta_magnitude",
    "direction",
    "magnitude",
    "matrix_detail",
    "read_table",
    "write_html",
    "write_table",
    "__version__",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dora_analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load on first use
    from .analysis import analyze
    from .config import AnalysisConfig
    from .crossrun import compare_runs
    from .decompose import compare, delta_direction, delta_magnitude, direction, magnitude
    from .drilldown import matrix_detail
    from .errors import DoraAnalysisError
    from .live import analyze_model
    from .report import write_html, write_table
    from .stats import correlate
    from .tables import read_table
