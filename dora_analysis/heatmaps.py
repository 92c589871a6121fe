"""Figures of the cross-run table (:func:`dora_analysis.compare_runs`): how alike runs' updates are.

* :func:`cross_run_heatmaps` — for one measure, a heatmap per pair of runs: layers (rows) ×
  module kinds (columns), the value of each matrix (the mean over experts of an MoE tensor).
* :func:`cross_run_overview` — for one measure, runs × runs: the mean over every matrix, so many
  seeds or methods are compared at a glance.

No file I/O; :mod:`dora_analysis.report` puts them in the HTML report, the dashboard on its
Cross-run page.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import columns as C
from .plots import empty_figure

#: How each measure is read: title, colour scale and range (cosine is signed; a sign conflict
#: of 0.5 is what two unrelated updates give).
MEASURE_STYLE: dict[str, dict] = {
    C.UPDATE_COSINE: {"title": "update cosine cos(ΔW_a, ΔW_b)", "colorscale": "RdBu",
                      "zmin": -1.0, "zmax": 1.0},
    C.SUBSPACE_SIMILARITY: {"title": "subspace similarity ‖U_aᵀU_b‖²_F / k (LoRA §7.2)",
                            "colorscale": "Viridis", "zmin": 0.0, "zmax": 1.0},
    C.SIGN_CONFLICT: {"title": "sign conflict among the top entries (TIES)",
                      "colorscale": "RdBu_r", "zmin": 0.0, "zmax": 1.0},
    C.MASK_JACCARD: {"title": "Jaccard index of the changed elements", "colorscale": "Viridis",
                     "zmin": 0.0, "zmax": 1.0},
}
#: Pairs of runs drawn in one heatmap figure; the overview shows every pair.
MAX_PAIRS = 24


def run_pairs(cross: pd.DataFrame) -> list[tuple[str, str]]:
    """The pairs of runs in the table, in table order."""
    return list(dict.fromkeys(zip(cross[C.RUN_A], cross[C.RUN_B], strict=True)))


def _grid(part: pd.DataFrame, measure: str, modules: list[str]) -> pd.DataFrame:
    """Layers × module kinds of one pair (mean over experts), modules in the given order."""
    layered = part[part[C.LAYER].notna()]
    grid = layered.pivot_table(index=C.LAYER, columns=C.MODULE, values=measure, aggfunc="mean",
                               dropna=False)
    return grid.reindex(columns=[m for m in modules if m in grid.columns]).sort_index()


def cross_run_heatmaps(cross: pd.DataFrame, measure: str = C.UPDATE_COSINE, *,
                       pairs: list[tuple[str, str]] | None = None) -> go.Figure:
    """One heatmap per pair of runs (layers × module kinds) of ``measure``.

    Example:
        >>> fig = cross_run_heatmaps(da.compare_runs("b/", ["r1/", "r2/"]))  # doctest: +SKIP
    """
    from .report import report_modules

    style = MEASURE_STYLE[measure]
    pairs = pairs or run_pairs(cross)
    shown = pairs[:MAX_PAIRS]
    if cross.empty or not shown or cross[C.LAYER].isna().all():
        return empty_figure(f"no layered matrices to draw for {measure}")
    modules = report_modules(cross)
    cols = min(len(shown), 4)
    rows = math.ceil(len(shown) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{a} vs {b}" for a, b in shown],
                        horizontal_spacing=0.06, vertical_spacing=min(0.12, 0.5 / rows))
    for i, (a, b) in enumerate(shown):
        grid = _grid(cross[(cross[C.RUN_A] == a) & (cross[C.RUN_B] == b)], measure, modules)
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(dtype=float), x=list(grid.columns), y=[int(v) for v in grid.index],
            colorscale=style["colorscale"], zmin=style["zmin"], zmax=style["zmax"],
            showscale=i == 0, colorbar={"title": measure},
            hovertemplate=f"{a} vs {b}<br>layer %{{y}}, %{{x}}<br>{measure} %{{z:.4g}}"
                          "<extra></extra>"), row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(title_text="layer", col=1, dtick=1)
    more = f" (first {MAX_PAIRS} of {len(pairs)} pairs)" if len(pairs) > MAX_PAIRS else ""
    fig.update_layout(title=f"{style['title']}, per pair of runs{more}", template="plotly_white",
                      height=120 + 260 * rows, width=min(1400, 340 * cols + 160))
    return fig


def cross_run_overview(cross: pd.DataFrame, measure: str = C.UPDATE_COSINE) -> go.Figure:
    """Runs × runs: the mean of ``measure`` over every matrix of each pair (symmetric; the
    diagonal, a run against itself, is left blank)."""
    style = MEASURE_STYLE[measure]
    if cross.empty:
        return empty_figure(f"no pairs of runs to draw for {measure}")
    runs = list(dict.fromkeys([*cross[C.RUN_A], *cross[C.RUN_B]]))
    means = cross.groupby([C.RUN_A, C.RUN_B], sort=False)[measure].mean()
    grid = pd.DataFrame(math.nan, index=runs, columns=runs)
    for (a, b), value in means.items():
        grid.loc[a, b] = grid.loc[b, a] = value
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(dtype=float), x=runs, y=runs, colorscale=style["colorscale"],
        zmin=style["zmin"], zmax=style["zmax"], colorbar={"title": measure},
        hovertemplate="%{y} vs %{x}<br>mean " + measure + " %{z:.4g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"{style['title']}: mean over matrices", template="plotly_white",
                      height=max(350, 120 + 28 * len(runs)), width=max(720, 200 + 28 * len(runs)))
    return fig
