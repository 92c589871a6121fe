"""Figure builders: panels, colours by layer, markers by step, fitted line, precision floor."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.plots import (
    STEP_SYMBOLS,
    correlation_figure,
    figure2,
    figure3,
    precision_floor,
)
from dora_analysis.report import html_report


@pytest.fixture(scope="module")
def table(ckpts):
    return pd.concat([
        da.analyze(ckpts["base"], ckpts["series"], labels=["FT"], methods=["ft"]),
        da.analyze(ckpts["base"], ckpts["tuned"], labels=["other"], methods=["lora"]),
    ], ignore_index=True)


def point_traces(fig):
    return [t for t in fig.data if t.mode == "markers"]


def test_figure2_panels_markers_colours_and_fit(table):
    fig = figure2(table, module="q")
    titles = [a.text for a in fig.layout.annotations if "r =" in a.text]
    assert len(titles) == 2  # one panel per checkpoint series
    ft = table[(table[C.CHECKPOINT] == "FT") & (table[C.MODULE] == "q")]
    r = stats.pearsonr(ft[C.DELTA_D], ft[C.DELTA_M]).statistic
    ft_title = next(t for t in titles if t.startswith("FT "))
    assert ft_title.startswith(f"FT (ft) · r = {r:+.2f}<br>")
    d = da.correlate(table).set_index([C.CHECKPOINT, C.MODULE]).loc[("FT", "q")]
    assert f"within-step {d[C.WITHIN_STEP_R]:+.2f}" in ft_title  # the diagnostics beside r
    assert f"95% CI [{d[C.R_CI_LOW]:+.2f}, {d[C.R_CI_HIGH]:+.2f}]" in ft_title
    ft_points = [t for t in point_traces(fig) if t.xaxis == "x"]
    assert [t.marker.symbol for t in ft_points] == list(STEP_SYMBOLS[:3])  # steps 10, 20, 30
    assert [t.name for t in ft_points] == ["step 10", "step 20", "step 30"]
    for trace in ft_points:
        assert sorted(trace.marker.color) == [0.0, 1.0, 2.0]  # colour = layer
        assert trace.marker.coloraxis == "coloraxis"
    line = next(t for t in fig.data if t.mode == "lines" and t.name == "fit FT")
    slope = (line.y[1] - line.y[0]) / (line.x[1] - line.x[0])
    assert slope == pytest.approx(stats.linregress(ft[C.DELTA_D], ft[C.DELTA_M]).slope, rel=1e-9)
    assert sum(len(t.x) for t in point_traces(fig)) == len(table[table[C.MODULE] == "q"])


def test_figure2_wraps_many_series_into_rows(table):
    q = table[table[C.MODULE] == "q"]
    many = pd.concat([q.assign(**{C.CHECKPOINT: f"run{i}"}) for i in range(7)], ignore_index=True)
    fig = figure2(many, module="q", columns=3)
    titles = [a.text for a in fig.layout.annotations if "r =" in a.text]
    assert len(titles) == 7
    axes = {(t.xaxis, t.yaxis) for t in point_traces(fig)}
    assert len(axes) == 7  # a panel each
    domains = {round(fig.layout[f"yaxis{'' if i == 1 else i}"].domain[0], 3) for i in range(1, 8)}
    assert len(domains) == 3  # 3 + 3 + 1 panels in three rows
    assert fig.layout.height > figure2(table, module="q").layout.height


def floors(fig):
    return [s for s in fig.layout.shapes if s.line.dash == "dot"]


def test_figure2_draws_the_precision_floor_where_it_matters(table):
    # bf16 weights with an FT-sized ΔD (1e-6): the rounding floor (1.4e-6) is among the points
    v = table[table[C.MODULE] == "v"]
    near = v.assign(**{C.DTYPE: "bfloat16", C.DELTA_D: np.linspace(1e-6, 5e-6, len(v))})
    fig = figure2(near, module="v")
    assert floors(fig) and floors(fig)[0].x0 == pytest.approx(precision_floor("bfloat16"))
    # float32's floor (~1e-14) lies far below ΔD ~1e-4: not drawn, the axis is not stretched to 0
    assert precision_floor("float32") < 1e-2 * v[C.DELTA_D].min()
    assert not floors(figure2(table, module="v"))


def test_figure2_without_points_says_so(table):
    fig = figure2(table, module="nonexistent")
    assert not fig.data and "no 'nonexistent' matrices" in fig.layout.annotations[0].text


def test_figure3_log_scale_toggle(table):
    linear, log = figure3(table, modules=("q", "v")), figure3(table, modules=("q", "v"),
                                                              log_y=True)
    y_axes = [k for k in log.layout if k.startswith("yaxis")]
    assert len(y_axes) == 4
    assert all(log.layout[a].type == "log" for a in y_axes)
    assert all(linear.layout[a].type == "linear" for a in y_axes)
    menu = log.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == ["linear y", "log y"] and menu.active == 1
    assert set(menu.buttons[1].args[0]) == {f"{a}.type" for a in y_axes}


def test_correlation_figure_shows_the_diagnostics(table):
    header = correlation_figure(da.correlate(table)).data[0].header.values
    assert {"pearson_r", "r_ci_low", "r_ci_high", "within_step_r", "partial_r"} <= set(header)


def test_figure3_lines_per_checkpoint_and_layer(table):
    fig = figure3(table, modules=("q", "v"))
    assert len(fig.data) == 2 * 2 * 2  # checkpoints x modules x (ΔM, ΔD)
    ft_q_dm = fig.data[0]
    assert list(ft_q_dm.x) == [0, 1, 2]
    last = table[(table[C.CHECKPOINT] == "FT") & (table[C.STEP] == 30) & (table[C.MODULE] == "q")]
    assert list(ft_q_dm.y) == pytest.approx(last.sort_values(C.LAYER)[C.DELTA_M].tolist())


def test_correlation_figure(table):
    fig = correlation_figure(da.correlate(table))
    assert fig.data[0].header.values[0] == "checkpoint"
    assert len(fig.data[0].cells.values[0]) == len(da.correlate(table))


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16),
                                                ("float16", torch.float16)])
def test_precision_floor_matches_a_simulation(dtype, torch_dtype):
    w = torch.randn(512, 2048, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rounded = w.to(torch_dtype).double()
    simulated = float((1 - torch.nn.functional.cosine_similarity(w, rounded, dim=1)).mean())
    assert precision_floor(dtype) == pytest.approx(simulated, rel=0.1)
    assert np.isnan(precision_floor("int8"))


def test_html_report_is_self_contained(table):
    text = html_report(table, da.correlate(table))
    assert text.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in text
    assert "<script src=" not in text  # plotly.js inline, no network needed
    assert "Per-matrix table" in text and "FT (ft)" in text


def test_metric_figures_follow_the_registry(ckpts):
    from dora_analysis.metrics import spectrum
    from dora_analysis.plots import metric_figure, metric_figures

    table = da.analyze(ckpts["base"], ckpts["series"], labels=["run"], modules=("q", "down"),
                       spectrum=True, intruders=True)
    figures = metric_figures(table)
    titles = [f.layout.title.text for f in figures]
    # tangential fraction, ΔM split, spectrum, intruders (not the warnings text)
    assert len(figures) == 4
    assert any("tangential" in t for t in titles) and any("intruder" in t for t in titles)
    fig = metric_figure(table, spectrum.METRIC, modules=("q", "down"))
    assert len(fig.data) == 7 * 2  # one line per column and module kind (one checkpoint)
    last = table[(table[C.STEP] == 30) & (table[C.MODULE] == "down")].sort_values(C.LAYER)
    line = next(t for t in fig.data if t.xaxis == "x2" and t.yaxis == "y2")  # row 1, col 2
    np.testing.assert_allclose(line.y, last["update_norm"], rtol=1e-12)  # last step per layer
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis7.type == "linear"  # stable rank
    empty = metric_figure(table.iloc[0:0], spectrum.METRIC)
    assert "no spectrum columns" in empty.layout.annotations[0].text


def test_drilldown_figure(ckpts):
    from dora_analysis.plots import drilldown_figure

    detail = da.matrix_detail(ckpts["base"], ckpts["tuned"],
                              "model.layers.0.self_attn.q_proj.weight", intruder_k=4)
    fig = drilldown_figure(detail)
    kinds = [t.type for t in fig.data]
    assert kinds == ["histogram", "histogram", "scatter", "scatter", "bar"]
    assert list(fig.data[0].x) == pytest.approx(list(detail.delta_m))
    assert len(fig.data[4].y) == 4 and fig.layout.yaxis3.type == "log"
    assert "ΔM = " in fig.layout.annotations[0].text


def two_layers(table: pd.DataFrame) -> pd.DataFrame:
    return table[table[C.LAYER] < 2]


def test_layer_axes_tick_whole_layers(table, ckpts):
    """A 2-layer model gets ticks 0 and 1 (not 0, 0.2 … 1): Figure 2's colour bar, Figure 3's
    and the metric figures' layer axes."""
    from dora_analysis.plots import metric_figures

    small = two_layers(table)
    assert figure2(small, module="q").layout.coloraxis.colorbar.tickvals == (0, 1)
    fig3 = figure3(small, modules=("q", "v"))
    assert {fig3.layout[a].tickvals for a in fig3.layout if a.startswith("xaxis")} == {(0, 1)}
    for fig in metric_figures(small):
        assert {fig.layout[a].tickvals for a in fig.layout if a.startswith("xaxis")} == {(0, 1)}
    from dora_analysis.plots import integer_ticks

    many = integer_ticks(range(80))
    assert many == {"tickmode": "linear", "tick0": 0, "dtick": 10}
    assert integer_ticks([]) == {} and integer_ticks([3.0, np.nan]) == {"tickmode": "array",
                                                                        "tickvals": [3]}


def test_scale_buttons_sit_between_the_title_and_the_panel_titles(table):
    """The linear/log buttons must not cover the figure's or a panel's title (they did)."""
    from dora_analysis.plots import FOOTER_PX, HEADER_PX, metric_figures

    button_px = 28  # a plotly button's height at the default font
    for fig in [figure3(table, modules=("q", "v")), *metric_figures(table)]:
        layout = fig.layout
        assert layout.margin.t == HEADER_PX and layout.title.yref == "container"
        panels_px = layout.height - HEADER_PX - FOOTER_PX
        bottom = (layout.updatemenus[0].y - 1) * panels_px  # px above the top panels
        assert layout.updatemenus[0].yanchor == "bottom"
        assert bottom >= 30  # clear of the panel titles (one 16 px line right above a panel)
        title_px = layout.title.pad.t + 2 * 20  # two lines from the top of the figure
        assert HEADER_PX - bottom - button_px >= title_px  # below the figure's title


def test_step_trend_shows_a_single_step(table):
    from dora_analysis.plots import step_trend

    one = table[(table[C.CHECKPOINT] == "FT") & (table[C.STEP] == 10)]
    fig = step_trend(one)
    assert len(fig.data) == 2 * one[C.MODULE].nunique()  # ΔM and ΔD per module kind
    assert all(list(t.x) == [10] and "markers" in t.mode for t in fig.data)
    q = one[(one[C.MODULE] == "q") & (one[C.AXIS] == "out")]
    first = next(t for t in fig.data if t.name == "q" and t.xaxis == "x")
    assert first.y[0] == pytest.approx(q[C.DELTA_M].mean())
    assert fig.layout.xaxis.tickvals == (10,)
    assert "no rows with a training step" in step_trend(
        table[table[C.STEP].isna()]).layout.annotations[0].text
