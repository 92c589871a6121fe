"""dora-analysis: how fine-tuning moves a model's weights, in magnitude and direction.

Follows Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (ICML 2024), §3.2: every
weight matrix is split into a magnitude (one norm per output channel) and a direction; ΔM and ΔD
(Eqs. 3-4) are measured per layer and training step, and their correlation separates full
fine-tuning and DoRA (negative) from LoRA (positive).

Example:
    >>> import dora_analysis as da
    >>> table = da.analyze("pre.safetensors", "tuned.safetensors")  # doctest: +SKIP
    >>> da.correlate(table)  # doctest: +SKIP
"""

from .analysis import analyze
from .config import AnalysisConfig
from .decompose import compare, delta_direction, delta_magnitude, direction, magnitude
from .errors import DoraAnalysisError
from .report import read_table, write_html, write_table
from .stats import correlate

__version__ = "0.1.0"

__all__ = [
    "AnalysisConfig",
    "DoraAnalysisError",
    "analyze",
    "compare",
    "correlate",
    "delta_direction",
    "delta_magnitude",
    "direction",
    "magnitude",
    "read_table",
    "write_html",
    "write_table",
    "__version__",
]
