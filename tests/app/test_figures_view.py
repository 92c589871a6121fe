"""The Figures page (dora_analysis/app/views/figures.py): Figure 3's log toggle, the diagnostics
beside r."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dora_analysis as da

testing = pytest.importorskip("streamlit.testing.v1")
PAGE = Path(da.__file__).parent / "app" / "views" / "figures.py"


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


def test_figures_page_shows_a_figure_per_metric(ckpts):
    table = da.analyze(ckpts["base"], ckpts["series"], labels=["FT"], spectrum=True)
    at = run(table)
    assert not at.exception
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"]
              for c in at.get("plotly_chart")[2:]]
    assert [t.removeprefix("<b>").split(" ")[0] for t in titles] == [
        "tangential", "delta_m_split", "spectrum"]


def test_tables_page_lists_health_warnings(ckpts):
    table = da.analyze(ckpts["base"], ckpts["tuned"], modules=("q",))
    table.loc[0, "warnings"] = "lora_B_zero,unchanged"
    at = testing.AppTest.from_file(str(PAGE.with_name("tables.py")), default_timeout=60)
    at.session_state["table"] = table
    at.session_state["source"] = "test"
    at.run()
    assert not at.exception
    texts = [w.value for w in at.warning]
    assert len(texts) == 2 and "lora_B is all zeros" in texts[0]


def test_drilldown_page_reads_one_matrix(ckpts):
    table = da.analyze(ckpts["base"], ckpts["series"], labels=["FT"], modules=("q", "down"))
    at = testing.AppTest.from_file(str(PAGE.with_name("drilldown.py")), default_timeout=120)
    at.session_state["table"] = table
    at.session_state["source"] = "test"
    at.run()  # the table names its base: nothing to type
    assert not at.exception and not at.error
    assert at.text_input(key="drilldown_base").value == str(ckpts["base"])
    (chart,) = at.get("plotly_chart")
    title = json.loads(chart.proto.spec)["layout"]["title"]["text"]
    assert title.startswith(table["name"].iloc[0]) and "checkpoint-30" in title
    assert len(at.dataframe[0].value) == table["rows"].iloc[0]  # one row per vector (axis out)
    at.text_input(key="drilldown_base").input(str(ckpts["root"] / "missing")).run()
    assert not at.exception and "missing: no such file or folder" in at.error[0].value


def test_drilldown_asks_for_the_base_of_a_table_that_does_not_name_it(ckpts):
    table = da.analyze(ckpts["base"], ckpts["tuned"], modules="q").drop(columns="base")
    at = testing.AppTest.from_file(str(PAGE.with_name("drilldown.py")), default_timeout=120)
    at.session_state["table"] = table
    at.session_state["source"] = "an older table"
    at.run()
    assert not at.exception and "Name the base" in at.info[0].value
    at.text_input(key="drilldown_base").input(str(ckpts["base"])).run()
    assert not at.exception and not at.error and at.get("plotly_chart")


def test_crossrun_page_compares_the_loaded_runs_against_the_recorded_base(ckpts):
    table = da.analyze(ckpts["base"], [ckpts["series"], ckpts["tuned"]], labels=["FT", "other"],
                       modules=("q", "v"))
    at = testing.AppTest.from_file(str(PAGE.with_name("crossrun.py")), default_timeout=120)
    at.session_state["table"] = table
    at.session_state["source"] = "test"
    at.run()
    assert not at.exception and at.text_input[0].value == str(ckpts["base"])
    next(b for b in at.button if b.label == "Compare runs").click()
    at.run()
    assert not at.exception and not at.error
    cross = at.session_state["cross_run"]
    expected = da.compare_runs(ckpts["base"], [ckpts["series"] / "checkpoint-30", ckpts["tuned"]],
                               labels=["FT", "other"], modules=("q", "v"))
    assert cross.drop(columns="base").equals(expected.drop(columns="base"))
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # the runs × runs overview, the per-pair heatmap
    heatmap = json.loads(charts[1].proto.spec)
    assert heatmap["data"][0]["type"] == "heatmap" and "FT vs other" in json.dumps(heatmap)
    at.radio[0].set_value("sign_conflict").run()
    assert not at.exception and "sign conflict" in json.dumps(
        json.loads(at.get("plotly_chart")[0].proto.spec)["layout"])


def test_a_table_of_both_axes_opens_on_the_output_channels(ckpts):
    """The CLI's default axis ('out': one norm per output channel) comes first, not 'in' by
    alphabetical order."""
    table = da.analyze(ckpts["base"], ckpts["tuned"], labels=["FT"], axis="both")
    at = run(table)
    assert not at.exception
    assert at.radio[0].options == ["out", "in"] and at.radio[0].value == "out"
