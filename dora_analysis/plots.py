"""Plotly figure builders for the paper's pictures. They take the analysis table and return
figures; no file I/O (see :mod:`dora_analysis.report` for the HTML report).

* :func:`figure2` — ΔD (x) vs ΔM (y), colour = layer, marker = training step, one panel per
  checkpoint series, least-squares line and Pearson r per panel (paper Figures 2 and 7).
* :func:`figure3` — ΔM and ΔD per layer as lines, checkpoints overlaid, one column per module kind
  (paper Figures 3 and 8).
* :func:`correlation_figure` — the correlation table.
* :func:`metric_figure` — any metric of the registry per layer (spectrum, intruders, tangential
  fraction …), one panel per column and module kind; :func:`metric_figures` one per metric the
  table holds.
* :func:`step_trend` — mean ΔM and ΔD per training step and module kind (a run being followed).
* :func:`drilldown_figure` — one matrix in detail (:func:`dora_analysis.matrix_detail`):
  histograms of the per-vector Δm and 1 − cos, ΔW's singular values against W0's, the intruder
  test's cosines.

The storage-precision floor of ΔD (:func:`precision_floor`) is drawn so that noise is not read
as signal: rounding a weight to bf16 alone moves its direction by 1 − cos ≈ 1.4e-6.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import columns as C
from . import metrics as registry
from .metrics.health import rounding_error_sq
from .stats import correlation, diagnostics, usable_points

if TYPE_CHECKING:
    from .drilldown import MatrixDetail
    from .metrics.base import Metric

#: Marker symbols per training step, in step order (Figure 2 "different markers").
STEP_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross",
                "triangle-down", "pentagon", "hexagon")
LAYER_COLORSCALE = "Viridis"

#: Unit roundoff of storage dtypes (half the gap between 1 and the next number).
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24,
                 "float64": 2.0**-53}


#: The floor is drawn when it is at least this share of the smallest ΔD in a panel.
FLOOR_SHOWN_ABOVE = 0.01
#: Pixels above the panels of a figure with linear/log buttons: its title (two lines) at the
#: top, the buttons below it, and the panels' own titles below them — none over another.
HEADER_PX = 120
FOOTER_PX = 60
#: Whole-number axes (layers, steps) tick every value up to this many, else a round stride.
MAX_LISTED_TICKS = 12


def integer_ticks(values) -> dict:
    """Axis (or colour bar) settings that tick whole numbers only, for layers and steps: each
    value when there are few, else a stride of 1, 2 or 5 × 10^k (never 0.2 of a layer).

    Example:
        >>> integer_ticks([0, 1])
        {'tickmode': 'array', 'tickvals': [0, 1]}
        >>> integer_ticks(range(32))["dtick"]
        5
    """
    numbers = sorted({int(v) for v in values if not pd.isna(v)})
    if not numbers:
        return {}
    if len(numbers) <= MAX_LISTED_TICKS:
        return {"tickmode": "array", "tickvals": numbers}
    rough = (numbers[-1] - numbers[0]) / (MAX_LISTED_TICKS - 2)
    decade = 10 ** math.floor(math.log10(rough))
    stride = next(m * decade for m in (1, 2, 5, 10) if m * decade >= rough)
    return {"tickmode": "linear", "tick0": 0, "dtick": max(1, int(stride))}


def precision_floor(dtype: str) -> float:
    """ΔD that storage rounding alone produces: ``u² / (16 ln 2)`` for unit roundoff ``u``.

    Rounding leaves an absolute error uniform in ``±ulp/2`` with ``ulp = 2u · 2^e``; over
    log-uniformly spread mantissas the mean squared relative error is ``u²/(8 ln 2)``, nearly all
    of it perpendicular to the vector, and ``1 − cos ≈ ½ |δ|²``. (A test checks it by simulation.)

    Example:
        >>> f"{precision_floor('bfloat16'):.1e}"
        '1.4e-06'
    """
    u = UNIT_ROUNDOFF.get(str(dtype).removeprefix("torch."))
    return math.nan if u is None else rounding_error_sq(u) / 2


def _select(table: pd.DataFrame, module: str | None, axis: str) -> pd.DataFrame:
    rows = usable_points(table)
    rows = rows[rows[C.AXIS] == axis]
    return rows if module is None else rows[rows[C.MODULE] == module]


def _signed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.2f}"


def diagnostics_text(d: dict, *, sep: str = " · ") -> str:
    """The diagnostics of :func:`dora_analysis.stats.diagnostics` in one short line.

    Example:
        >>> diagnostics_text({"r_ci_low": -0.1, "r_ci_high": 0.5, "within_step_r": -0.4,
        ...                   "within_layer_r": 0.9, "partial_r": -0.3, "n_steps": 4})
        '95% CI [-0.10, +0.50] · within-step -0.40 · within-layer +0.90 · partial -0.30'
    """
    parts = []
    if not math.isnan(d.get(C.R_CI_LOW, math.nan)):
        parts.append(f"95% CI [{_signed(d[C.R_CI_LOW])}, {_signed(d[C.R_CI_HIGH])}]")
    if d.get(C.N_STEPS, 1) > 1:  # one step: within-step and partial r are the pooled r
        parts += [f"within-step {_signed(d[C.WITHIN_STEP_R])}",
                  f"within-layer {_signed(d[C.WITHIN_LAYER_R])}",
                  f"partial {_signed(d[C.PARTIAL_R])}"]
    return sep.join(parts)


def _series_title(rows: pd.DataFrame, label: str, r: float) -> str:
    method = rows[C.METHOD].iloc[0]
    r_text = "r = n/a" if math.isnan(r) else f"r = {r:+.2f}"
    parts = diagnostics_text(diagnostics(rows)).split(" · ") if len(rows) else []
    # Two short lines, not one long one: three panels side by side must not overlap.
    first = [p for p in parts if p.startswith(("95%", "partial"))]
    second = [p for p in parts if p.startswith("within")]
    more = "<br>".join(" · ".join(line) for line in (first, second) if line)
    return f"{label} ({method}) · {r_text}" + (f"<br><sup>{more}</sup>" if more else "")


def figure2(table: pd.DataFrame, *, module: str = "q", axis: str = "out",
            columns: int = 3) -> go.Figure:
    """Figure 2: ΔD vs ΔM for one module kind, one panel per checkpoint series, ``columns``
    panels per row.

    Example:
        >>> fig = figure2(da.analyze("base/", ["ft/", "lora/"]), module="q")  # doctest: +SKIP
    """
    rows = _select(table, module, axis)
    labels = list(dict.fromkeys(rows[C.CHECKPOINT]))
    if not labels:
        return empty_figure(f"no {module!r} matrices (axis {axis}) to plot")
    fits = {label: correlation(g[C.DELTA_D].to_numpy(), g[C.DELTA_M].to_numpy())
            for label, g in rows.groupby(C.CHECKPOINT, sort=False)}
    n_cols = min(columns, len(labels))
    n_rows = math.ceil(len(labels) / n_cols)
    height = 140 + 360 * n_rows
    # ~130 px between rows: a panel's three-line title above, the ΔD axis below.
    gap = min(130 / (height - 210), 0.9 / max(n_rows - 1, 1))
    fig = make_subplots(rows=n_rows, cols=n_cols, horizontal_spacing=0.08,
                        vertical_spacing=gap,
                        subplot_titles=[_series_title(rows[rows[C.CHECKPOINT] == lab], lab,
                                                      fits[lab][C.PEARSON_R]) for lab in labels])
    layers = rows[C.LAYER].astype("float64")
    cmin, cmax = (float(layers.min()), float(layers.max())) if layers.notna().any() else (0, 1)
    steps = sorted(s for s in rows[C.STEP].dropna().unique())
    for index, label in enumerate(labels):
        row, col = divmod(index, n_cols)
        row, col = row + 1, col + 1
        series = rows[rows[C.CHECKPOINT] == label]
        for step_value, group in series.groupby(series[C.STEP].astype("float64").fillna(-1)):
            step = None if step_value == -1 else int(step_value)
            symbol = STEP_SYMBOLS[steps.index(step) % len(STEP_SYMBOLS)] if step is not None \
                else "circle"
            fig.add_trace(go.Scatter(
                x=group[C.DELTA_D], y=group[C.DELTA_M], mode="markers",
                name=f"step {step}" if step is not None else "final", legendgroup=f"step {step}",
                showlegend=index == 0,
                marker={"symbol": symbol, "size": 10, "color": group[C.LAYER].astype("float64"),
                        "coloraxis": "coloraxis", "line": {"width": 0.5, "color": "#333"}},
                customdata=np.stack([group[C.NAME], group[C.LAYER].astype("float64")], axis=-1),
                hovertemplate="%{customdata[0]}<br>layer %{customdata[1]}<br>ΔD %{x:.3e}"
                              "<br>ΔM %{y:.3e}<extra></extra>",
            ), row=row, col=col)
        fit = fits[label]
        if not math.isnan(fit[C.SLOPE]):
            x = np.linspace(series[C.DELTA_D].min(), series[C.DELTA_D].max(), 2)
            fig.add_trace(go.Scatter(
                x=x, y=fit[C.SLOPE] * x + fit[C.INTERCEPT], mode="lines",
                line={"color": "crimson", "dash": "dash"}, showlegend=False,
                name=f"fit {label}", hoverinfo="skip",
            ), row=row, col=col)
        floor = precision_floor(series[C.DTYPE].iloc[0]) if C.DTYPE in series else math.nan
        # A floor far below every point (float32: ~1e-14) says nothing and, drawn at x ≈ 0,
        # would squeeze the points against the right edge.
        if not math.isnan(floor) and floor >= FLOOR_SHOWN_ABOVE * series[C.DELTA_D].min():
            fig.add_vline(x=floor, line={"color": "gray", "dash": "dot"}, row=row, col=col,
                          annotation_text=f"{series[C.DTYPE].iloc[0]} floor",
                          annotation_position="top right", annotation_font_size=10)
        fig.update_xaxes(title_text="ΔD", exponentformat="e", row=row, col=col)
    fig.update_yaxes(exponentformat="e")
    fig.update_yaxes(title_text="ΔM", col=1)
    fig.update_layout(
        title=f"Magnitude vs direction updates of {module!r} matrices (axis {axis})",
        coloraxis={"colorscale": LAYER_COLORSCALE, "cmin": cmin, "cmax": cmax,
                   "colorbar": {"title": "layer", **integer_ticks(layers)}},
        legend={"title": "training step", "orientation": "h", "y": -0.2 / n_rows},
        template="plotly_white", height=height, margin={"t": 130},
    )
    return fig


def figure3(table: pd.DataFrame, *, modules: tuple[str, ...] = ("q",),
            axis: str = "out", log_y: bool = False) -> go.Figure:
    """Figure 3: ΔM (top) and ΔD (bottom) per layer, one line per checkpoint (its last step).

    ``log_y`` starts with logarithmic y axes (FT's changes are ~100× smaller than an adapter's and
    look flat on linear axes); buttons in the figure switch between linear and log.
    """
    rows = _select(table, None, axis)
    rows = rows[rows[C.MODULE].isin(modules) & rows[C.LAYER].notna()]
    if rows.empty:
        return empty_figure(f"no layered {', '.join(modules)} matrices (axis {axis}) to plot")
    last = rows[C.STEP].astype("float64").fillna(-1)
    rows = rows[last == last.groupby(rows[C.CHECKPOINT]).transform("max")]
    fig = make_subplots(rows=2, cols=len(modules), shared_xaxes=True, vertical_spacing=0.08,
                        horizontal_spacing=0.06, subplot_titles=[f"{m}: ΔM" for m in modules]
                        + [f"{m}: ΔD" for m in modules])
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
    for i, label in enumerate(dict.fromkeys(rows[C.CHECKPOINT])):
        color = palette[i % len(palette)]
        for col, module in enumerate(modules, start=1):
            part = rows[(rows[C.CHECKPOINT] == label) & (rows[C.MODULE] == module)]
            part = part.groupby(C.LAYER, as_index=False)[[C.DELTA_M, C.DELTA_D]].mean()
            for row, metric in ((1, C.DELTA_M), (2, C.DELTA_D)):
                fig.add_trace(go.Scatter(
                    x=part[C.LAYER], y=part[metric], mode="lines+markers", name=label,
                    legendgroup=label, showlegend=row == 1 and col == 1,
                    line={"color": color},
                ), row=row, col=col)
    fig.update_xaxes(**integer_ticks(rows[C.LAYER]))
    fig.update_xaxes(title_text="layer", row=2)
    fig.update_yaxes(exponentformat="e", type="log" if log_y else "linear")
    fig.update_layout(template="plotly_white", legend={"title": "checkpoint"})
    with_header(fig, f"Per-layer ΔM and ΔD (axis {axis})",
                "each checkpoint at its last step", height=620, log_y=log_y)
    return fig


def with_header(fig: go.Figure, title: str, subtitle: str, *, height: int,
                log_y: bool = False) -> None:
    """Title (bold line, smaller second line) at the top left, linear/log buttons under it at
    the right, and the panels below both: the buttons never cover a title."""
    panels_px = height - HEADER_PX - FOOTER_PX
    fig.update_layout(
        height=height, margin={"t": HEADER_PX, "b": FOOTER_PX},
        title={"text": f"<b>{title}</b><br><sup>{subtitle}</sup>", "x": 0, "xref": "paper",
               "xanchor": "left", "y": 1, "yref": "container", "yanchor": "top",
               "pad": {"t": 14}},
        updatemenus=[y_scale_buttons(fig, log_y, y=1 + 34 / panels_px)])


def y_scale_buttons(fig: go.Figure, log_y: bool = False, *, y: float = 1.12) -> dict:
    """Plotly buttons that switch every y axis of ``fig`` between linear and log scale, their
    bottom edge at ``y`` (paper coordinates)."""
    axes = [name for name in fig.layout if name.startswith("yaxis")]

    def button(kind: str) -> dict:
        return {"label": f"{kind} y", "method": "relayout",
                "args": [{f"{a}.type": kind for a in axes}]}

    return {"type": "buttons", "direction": "right", "x": 1.0, "xanchor": "right", "y": y,
            "yanchor": "bottom", "active": 1 if log_y else 0, "showactive": True,
            "pad": {"t": 0, "b": 0}, "buttons": [button("linear"), button("log")]}


def correlation_figure(correlations: pd.DataFrame) -> go.Figure:
    """The correlation table as a figure (for the report and the dashboard)."""
    shown = [C.CHECKPOINT, C.METHOD, C.MODULE, C.AXIS, C.N, C.PEARSON_R, C.R_CI_LOW, C.R_CI_HIGH,
             C.P_VALUE, C.SPEARMAN_RHO, C.SLOPE, C.WITHIN_STEP_R, C.WITHIN_LAYER_R, C.PARTIAL_R]
    shown = [col for col in shown if col in correlations or col in C.GROUP_COLUMNS]
    cells = []
    for col in shown:
        values = correlations[col] if col in correlations else pd.Series([], dtype=object)
        cells.append([f"{v:.3g}" if isinstance(v, float) else v for v in values])
    fig = go.Figure(go.Table(header={"values": shown, "fill_color": "#e8e8f0"},
                             cells={"values": cells}))
    fig.update_layout(height=90 + 24 * len(correlations), margin={"t": 20, "b": 10})
    return fig


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _last_steps(rows: pd.DataFrame) -> pd.DataFrame:
    """Each checkpoint series' rows at its last step (a single checkpoint: all its rows)."""
    last = rows[C.STEP].astype("float64").fillna(-1)
    return rows[last == last.groupby(rows[C.CHECKPOINT]).transform("max")]


def metric_figure(table: pd.DataFrame, metric: Metric, *, modules: tuple[str, ...] | None = None,
                  axis: str = "out", log_y: bool | None = None) -> go.Figure:
    """One registry metric per layer: a panel per numeric column (rows) and module kind
    (columns), one line per checkpoint at its last step; log y where the column says so
    (``log_y`` forces either), with linear/log buttons.

    Example:
        >>> from dora_analysis.metrics import spectrum
        >>> table = da.analyze("b/", "t/", spectrum=True)  # doctest: +SKIP
        >>> fig = metric_figure(table, spectrum.METRIC)  # doctest: +SKIP
    """
    cols = [c for c in metric.columns if c.name in table and c.dtype != "string"]
    rows = table[(table[C.AXIS] == axis) & table[C.LAYER].notna()] if len(table) else table
    if len(rows):
        modules = tuple(modules or list(dict.fromkeys(rows[C.MODULE]))[:3])
        rows = rows[rows[C.MODULE].isin(modules)]
    if not cols or rows.empty:
        return empty_figure(f"no {metric.name} columns for layered matrices (axis {axis}) to plot")
    rows = _last_steps(rows)
    fig = make_subplots(rows=len(cols), cols=len(modules), shared_xaxes=True,
                        vertical_spacing=min(0.1, 0.6 / len(cols)), horizontal_spacing=0.06,
                        subplot_titles=[f"{m}: {c.name}" for c in cols for m in modules])
    for i, label in enumerate(dict.fromkeys(rows[C.CHECKPOINT])):
        for j, module in enumerate(modules, start=1):
            part = rows[(rows[C.CHECKPOINT] == label) & (rows[C.MODULE] == module)]
            for k, col in enumerate(cols, start=1):
                values = pd.to_numeric(part[col.name], errors="coerce").astype("float64")
                per_layer = values.groupby(part[C.LAYER].astype("float64")).mean()
                fig.add_trace(go.Scatter(
                    x=per_layer.index, y=per_layer.to_numpy(), mode="lines+markers", name=label,
                    legendgroup=label, showlegend=j == 1 and k == 1,
                    line={"color": PALETTE[i % len(PALETTE)]},
                    hovertemplate=f"{label}<br>layer %{{x}}<br>{col.name} %{{y:.4g}}"
                                  "<extra></extra>"), row=k, col=j)
            for k, col in enumerate(cols, start=1):
                log = col.log_scale if log_y is None else log_y
                fig.update_yaxes(type="log" if log else "linear", exponentformat="e",
                                 row=k, col=j)
    fig.update_xaxes(**integer_ticks(rows[C.LAYER]))
    fig.update_xaxes(title_text="layer", row=len(cols))
    fig.update_layout(template="plotly_white", legend={"title": "checkpoint"})
    with_header(fig, f"{metric.name} — per layer, last step (axis {axis})", metric.description,
                height=HEADER_PX + FOOTER_PX + 60 + 230 * len(cols))
    return fig


def metric_figures(table: pd.DataFrame, *, modules: tuple[str, ...] | None = None,
                   axis: str = "out") -> list[go.Figure]:
    """:func:`metric_figure` for every registry metric beyond Eqs. 3-4 whose numeric columns the
    table holds (tangential fraction, spectrum, intruders …)."""
    return [metric_figure(table, m, modules=modules, axis=axis) for m in registry.METRICS
            if m.name != "decomposition"
            and any(c.name in table and c.dtype != "string" for c in m.columns)]


def step_trend(table: pd.DataFrame, *, axis: str = "out") -> go.Figure:
    """Mean ΔM (left) and ΔD (right) per training step, one line per module kind, with markers:
    a run followed from its first checkpoint shows that step's values.

    Example:
        >>> fig = step_trend(da.read_table("run/dora_analysis.parquet"))  # doctest: +SKIP
    """
    rows = _select(table, None, axis)
    rows = rows[rows[C.STEP].notna()]
    if rows.empty:
        return empty_figure(f"no rows with a training step (axis {axis}) to plot")
    means = rows.groupby([C.MODULE, C.STEP], sort=True)[[C.DELTA_M, C.DELTA_D]].mean()
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=["mean ΔM per step", "mean ΔD per step"])
    for i, module in enumerate(dict.fromkeys(means.index.get_level_values(C.MODULE))):
        part = means.loc[module]
        for col, metric in ((1, C.DELTA_M), (2, C.DELTA_D)):
            fig.add_trace(go.Scatter(
                x=part.index.astype("int64"), y=part[metric], mode="lines+markers", name=module,
                legendgroup=module, showlegend=col == 1, line={"color": PALETTE[i % len(PALETTE)]},
                hovertemplate=f"{module}<br>step %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>",
            ), row=1, col=col)
    fig.update_xaxes(title_text="step", **integer_ticks(rows[C.STEP]))
    fig.update_yaxes(exponentformat="e")
    fig.update_layout(template="plotly_white", height=380, legend={"title": "module kind"},
                      margin={"t": 50})
    return fig


def drilldown_figure(detail: MatrixDetail) -> go.Figure:
    """One matrix (:class:`dora_analysis.drilldown.MatrixDetail`): histograms of the per-vector
    Δm = m_t − m_0 and 1 − cos, the singular values of ΔW and W0, the intruder test."""
    fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.1, vertical_spacing=0.16,
                        subplot_titles=[
                            f"Δm = m_t − m_0 per vector (mean |Δm| = ΔM = "
                            f"{np.nanmean(np.abs(detail.delta_m)):.3e})",
                            f"1 − cos per vector (mean = ΔD = "
                            f"{np.nanmean(detail.one_minus_cos):.3e}; log x)",
                            "singular values: ΔW and W0 (log y)",
                            "top singular vectors of Wt: best |cos| with W0's"])
    fig.add_trace(go.Histogram(x=detail.delta_m, nbinsx=60, name="Δm", marker_color=PALETTE[0]),
                  row=1, col=1)
    positive = detail.one_minus_cos[detail.one_minus_cos > 0]
    fig.add_trace(go.Histogram(x=np.log10(positive), nbinsx=60, name="log10(1 − cos)",
                               marker_color=PALETTE[1]), row=1, col=2)
    fig.update_xaxes(title_text="m_t − m_0", row=1, col=1)
    fig.update_xaxes(title_text="log10(1 − cos)", row=1, col=2)
    for sigma, label, color in ((detail.sigma_delta, "σ(ΔW)", PALETTE[2]),
                                (detail.sigma_base, "σ(W0)", "#777")):
        if sigma is not None:
            fig.add_trace(go.Scatter(x=np.arange(1, len(sigma) + 1), y=sigma, mode="lines",
                                     name=label, line={"color": color}), row=2, col=1)
    fig.update_yaxes(type="log", exponentformat="power", dtick=1, row=2, col=1)  # decades only
    fig.update_xaxes(title_text="index i", row=2, col=1)
    if detail.intruder_cos is not None:
        cos = detail.intruder_cos
        fig.add_trace(go.Bar(x=np.arange(1, len(cos) + 1), y=cos, name="best |cos|",
                             marker_color=[PALETTE[1] if c < detail.intruder_eps else PALETTE[0]
                                           for c in cos]), row=2, col=2)
        fig.add_hline(y=detail.intruder_eps, line={"dash": "dot", "color": "gray"}, row=2,
                      col=2, annotation_text=f"ε = {detail.intruder_eps}",
                      annotation_position="top left",
                      annotation={"bgcolor": "rgba(255,255,255,0.85)", "font": {"color": "black"}})
        fig.update_yaxes(range=[0, 1.05], row=2, col=2)
        fig.update_xaxes(title_text="singular vector of Wt (red: intruder)", row=2, col=2)
    fig.update_layout(title=f"{detail.name} — {detail.checkpoint} (axis {detail.axis}"
                      + (f", expert {detail.expert}" if detail.expert is not None else "") + ")",
                      template="plotly_white", height=720, showlegend=True, bargap=0.05)
    return fig


def empty_figure(message: str) -> go.Figure:
    """A blank figure that says why there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(template="plotly_white", height=300, xaxis_visible=False,
                      yaxis_visible=False)
    return fig
