"""The metric registry: columns, switches and settings come from one place."""

from __future__ import annotations

import pytest

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis import metrics
from dora_analysis.analysis import table_columns
from dora_analysis.config import AnalysisConfig
from dora_analysis.errors import ConfigError
from dora_analysis.metrics.base import Column, Metric, Setting, any_number


def test_always_on_metrics_fill_the_contract_columns(ckpts):
    table = da.analyze(ckpts["base"], ckpts["tuned"], modules=("q",))
    assert list(table.columns) == table_columns(AnalysisConfig())
    for column in metrics.metric_columns(AnalysisConfig()):
        assert column.name in table and str(table[column.name].dtype) == column.dtype


def test_the_table_follows_the_registry(monkeypatch, ckpts):
    """A new metric is one entry: its switch, setting and column appear without other edits."""
    seen = {}

    def rows_over_cols(view):
        seen["setting"] = view.config.setting("scale")
        rows, cols = view.pair.matrix_shape
        return {"aspect": view.config.setting("scale") * rows / cols}

    extra = Metric("aspect", "rows per column", (Column("aspect", "float64", "rows/cols"),),
                   rows_over_cols, option="aspect", per_axis=False,
                   settings=(Setting("scale", 1.0, "multiplier", check=any_number),))
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, extra))
    plain = da.analyze(ckpts["base"], ckpts["tuned"], modules=("q",))
    assert "aspect" not in plain
    table = da.analyze(ckpts["base"], ckpts["tuned"], modules=("q",), axis="both", aspect=True,
                       scale=2.0)
    assert (table["aspect"] == 2.0 * table[C.ROWS] / table[C.COLS]).all()
    assert seen["setting"] == 2.0
    assert list(table.columns)[-1] == "aspect"


def test_unknown_switches_and_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="unknown metric.*nope"):
        AnalysisConfig(metrics=("nope",))
    with pytest.raises(ConfigError, match="unknown metric setting.*k"):
        AnalysisConfig(metric_settings=(("k", 3),))
    with pytest.raises(ConfigError, match="unknown analysis setting"):
        AnalysisConfig.from_settings(colour="red")


def test_metric_costs_are_declared():
    with pytest.raises(ValueError, match="cost"):
        Metric("x", "x", (), lambda view: {}, cost="free")
    assert {m.cost for m in metrics.METRICS} <= set(metrics.COSTS)


def test_the_command_line_offers_each_metric_switch_and_setting(monkeypatch, ckpts, tmp_path):
    from dora_analysis.cli import build_parser, main

    extra = Metric("aspect", "rows per column", (Column("aspect", "float64", "rows/cols"),),
                   lambda view: {"aspect": view.config.setting("scale")}, option="aspect",
                   per_axis=False, cost="dense",
                   settings=(Setting("scale", 1.0, "multiplier", check=any_number),))
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, extra))
    help_text = build_parser().format_help()
    assert "--aspect" in help_text and "--scale VALUE" in help_text and "default: 1.0" in help_text
    out = tmp_path / "t.csv"
    assert main([str(ckpts["base"]), str(ckpts["tuned"]), "--modules", "q", "--aspect",
                 "--scale", "3", "-o", str(out), "-q"]) == 0
    import pandas as pd

    assert set(pd.read_csv(out)["aspect"]) == {3.0}


def test_every_array_function_is_exported_from_the_package():
    """``from dora_analysis.metrics import X`` gives the function itself (never a submodule of
    the same name), for every name of ``__all__``."""
    import importlib.util
    import types

    for name in metrics.FUNCTIONS:
        assert name in metrics.__all__
        value = getattr(metrics, name)
        assert not isinstance(value, types.ModuleType) and callable(value), name
        module = metrics.FUNCTIONS[name]
        where = importlib.util.resolve_name(module if module.startswith("..") else f".{module}",
                                            metrics.__name__)
        assert value.__module__ == where
