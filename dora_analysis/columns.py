"""Column names of the two output tables (SPEC §4): part of the public contract."""

from __future__ import annotations

from typing import Literal

#: The two axes vectors run along (see :mod:`dora_analysis.decompose`).
Axis = Literal["out", "in"]

# Analysis table: one row per (checkpoint, weight matrix, axis).
CHECKPOINT = "checkpoint"
METHOD = "method"
STEP = "step"
NAME = "name"
LAYER = "layer"
MODULE = "module"
ROWS = "rows"
COLS = "cols"
AXIS = "axis"
DELTA_M = "delta_m"
DELTA_D = "delta_d"
ZERO_VECTORS = "zero_vectors"
# Optional and extra columns (welcome by the contract).
EXPERT = "expert"
N_VECTORS = "n_vectors"
NONFINITE_VECTORS = "nonfinite_vectors"
MEAN_M0 = "mean_m0"
DTYPE = "dtype"
TUNED_NAME = "tuned_name"
REF = "ref"
#: The base checkpoint the row was measured against, as given: a saved table names its base, so
#: the dashboard's drill-down need not ask for it again.
BASE = "base"
#: The training run a row belongs to (tables a training callback appends to; see
#: dora_analysis.integrations.transformers): a table never pools two runs' rows.
RUN = "run"

TABLE_COLUMNS: tuple[str, ...] = (
    CHECKPOINT, METHOD, STEP, NAME, LAYER, MODULE, ROWS, COLS, AXIS,
    DELTA_M, DELTA_D, ZERO_VECTORS, EXPERT, N_VECTORS, NONFINITE_VECTORS, MEAN_M0, DTYPE,
    TUNED_NAME, REF, BASE,
)

#: pandas dtype of each contract column (the metrics' columns declare theirs in the registry,
#: :mod:`dora_analysis.metrics`): how tables are built and how every format is read back.
TABLE_DTYPES: dict[str, str] = {
    CHECKPOINT: "str", METHOD: "str", STEP: "Int64", NAME: "str", LAYER: "Int64", MODULE: "str",
    ROWS: "int64", COLS: "int64", AXIS: "str", EXPERT: "Int64", DTYPE: "str", TUNED_NAME: "str",
    REF: "str", BASE: "str",
}

# Correlation table: one row per group (checkpoint series x module kind x axis).
N = "n"
PEARSON_R = "pearson_r"
P_VALUE = "p_value"
SPEARMAN_RHO = "spearman_rho"
SLOPE = "slope"
INTERCEPT = "intercept"
MEAN_DELTA_M = "mean_delta_m"
MEAN_DELTA_D = "mean_delta_d"
# Diagnostics beside the pooled r (dora_analysis.stats): which variation the r comes from.
N_STEPS = "n_steps"
N_LAYERS = "n_layers"
WITHIN_STEP_R = "within_step_r"
WITHIN_LAYER_R = "within_layer_r"
PARTIAL_R = "partial_r"
R_CI_LOW = "r_ci_low"
R_CI_HIGH = "r_ci_high"

GROUP_COLUMNS: tuple[str, ...] = (CHECKPOINT, METHOD, MODULE, AXIS)
STAT_COLUMNS: tuple[str, ...] = (
    N, PEARSON_R, P_VALUE, SPEARMAN_RHO, SLOPE, INTERCEPT, MEAN_DELTA_M, MEAN_DELTA_D,
)
DIAGNOSTIC_COLUMNS: tuple[str, ...] = (
    N_STEPS, N_LAYERS, WITHIN_STEP_R, WITHIN_LAYER_R, PARTIAL_R, R_CI_LOW, R_CI_HIGH,
)
CORRELATION_COLUMNS: tuple[str, ...] = (*GROUP_COLUMNS, *STAT_COLUMNS, *DIAGNOSTIC_COLUMNS)

# Cross-run table (dora_analysis.compare_runs): one row per pair of runs x weight matrix.
RUN_A = "run_a"
RUN_B = "run_b"
UPDATE_COSINE = "update_cosine"
SUBSPACE_SIMILARITY = "subspace_similarity"
SIGN_CONFLICT = "sign_conflict"
MASK_JACCARD = "mask_jaccard"
#: The k that subspace_similarity used (``k`` clamped to the ranks of the two updates).
SUBSPACE_K = "subspace_k"
CROSS_RUN_MEASURES: tuple[str, ...] = (UPDATE_COSINE, SUBSPACE_SIMILARITY, SIGN_CONFLICT,
                                       MASK_JACCARD)
CROSS_RUN_COLUMNS: tuple[str, ...] = (RUN_A, RUN_B, NAME, LAYER, MODULE, *CROSS_RUN_MEASURES,
                                      EXPERT, SUBSPACE_K, BASE)
CROSS_RUN_DTYPES: dict[str, str] = {
    RUN_A: "str", RUN_B: "str", NAME: "str", LAYER: "Int64", MODULE: "str", EXPERT: "Int64",
    SUBSPACE_K: "int64", BASE: "str", **dict.fromkeys(CROSS_RUN_MEASURES, "float64"),
}

METHODS: tuple[str, ...] = ("ft", "lora", "dora", "unknown")
AXES: tuple[str, ...] = ("out", "in")
