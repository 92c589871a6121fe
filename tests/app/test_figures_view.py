"""The Figures page (app/views/figures.py): Figure 3's log toggle, the diagnostics beside r."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dora_analysis as da

testing = pytest.importorskip("streamlit.testing.v1")
PAGE = Path(__file__).resolve().parents[2] / "app" / "views" / "figures.py"


@pytest.fixture(scope="module")
def table(ckpts):
    return da.analyze(ckpts["base"], [ckpts["series"], ckpts["tuned"]], labels=["FT", "other"],
                      methods=["ft", "lora"])


def run(table):
    at = testing.AppTest.from_file(str(PAGE), default_timeout=60)
    at.session_state["table"] = table
    at.session_state["source"] = "test"
    return at.run()


def y_types(chart) -> set[str]:
    layout = json.loads(chart.proto.spec)["layout"]
    return {v.get("type") for k, v in layout.items() if k.startswith("yaxis")}


def test_figure3_log_toggle_and_diagnostics(table):
    at = run(table)
    assert not at.exception
    figure3 = at.get("plotly_chart")[1]
    assert y_types(figure3) == {"linear"}
    at.toggle[0].set_value(True).run()
    assert not at.exception and y_types(at.get("plotly_chart")[1]) == {"log"}
    columns = set(at.dataframe[0].value.columns)
    assert {"within_step_r", "within_layer_r", "partial_r", "r_ci_low", "r_ci_high"} <= columns
    figure2 = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["annotations"]
    assert any("within-step" in a["text"] for a in figure2)
