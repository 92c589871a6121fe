"""Each dashboard page under streamlit's AppTest, on real fixture checkpoints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import dora_analysis as da

testing = pytest.importorskip("streamlit.testing.v1")
APP = Path(importlib.util.find_spec("dora_analysis.app").origin).parent
CACHE = "dora_analysis.app.cache"  # the module the pages import


def run(page: str, table=None, **state):
    at = testing.AppTest.from_file(str(APP / page), default_timeout=60)
    if table is not None:
        at.session_state["table"] = table
        at.session_state["source"] = "test"
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


@pytest.fixture(scope="module")
def table(ckpts):
    return da.analyze(ckpts["base"], [ckpts["series"], ckpts["tuned"]], labels=["FT", "other"],
                      methods=["ft", "lora"])


def test_entry_wires_the_data_page(monkeypatch):
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    at = run("streamlit_app.py")
    assert not at.exception
    assert any("Load the demo data" in b.label for b in at.button)


def test_data_page_runs_an_analysis(ckpts, monkeypatch):
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    at = run("views/data.py")
    at.text_input[0].input(str(ckpts["base"]))
    at.text_area[0].input(f"{ckpts['series']}\n{ckpts['tuned']}")
    at.text_area[1].input("FT\ntuned")  # --label, one per reference
    at.text_input[1].input("q,v")
    next(b for b in at.button if b.label == "Run analysis").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    result = at.session_state["table"]
    assert set(result["checkpoint"]) == {"FT", "tuned"} and set(result["module"]) == {"q", "v"}


def test_data_page_analyses_a_dcp_folder(ckpts, tmp_path, monkeypatch):
    """Every checkpoint reference of the library works in the page (here a Trainer FSDP run)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": load_file(ckpts["tuned"])},
                 checkpoint_id=tmp_path / "run" / "checkpoint-5" / "pytorch_model_fsdp_0")
    at = run("views/data.py")
    at.text_input[0].input(str(ckpts["base"]))
    at.text_area[0].input(str(tmp_path / "run"))
    at.text_area[1].input("FSDP")
    next(b for b in at.button if b.label == "Run analysis").click()
    at.run()
    assert not at.exception and not at.error
    result = at.session_state["table"]
    assert set(result["checkpoint"]) == {"FSDP"} and set(result["step"]) == {5}


def test_data_page_shows_errors_in_the_page(ckpts, tmp_path, monkeypatch):
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    at = run("views/data.py")
    at.text_input[0].input(str(tmp_path / "missing.safetensors"))
    at.text_area[0].input(str(ckpts["tuned"]))
    next(b for b in at.button if b.label == "Run analysis").click()
    at.run()
    assert not at.exception
    assert "missing.safetensors: no such file or folder" in at.error[0].value
    assert "Traceback" not in at.error[0].value


def test_figures_page_renders_figures_and_filters(table):
    at = run("views/figures.py", table)
    assert not at.exception
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # Figures 2 and 3, tangential fraction and ΔM split per layer
    assert len(at.dataframe) == 1
    at.selectbox[0].select("v").run()
    assert not at.exception and "'v' matrices" in at.header[0].value


def test_pages_without_data_say_what_to_do(monkeypatch):
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    for page in ("views/figures.py", "views/tables.py"):
        at = run(page)
        assert not at.exception and "Data" in at.info[0].value


def test_tables_page_offers_downloads(table):
    at = run("views/tables.py", table)
    assert not at.exception
    assert len(at.dataframe) == 2
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["Download the table (CSV)", "Download the correlations (CSV)",
                      "Download the HTML report"]


@pytest.fixture(scope="module")
def cache_module():
    from dora_analysis.app import cache

    return cache


def test_uploaded_tables(cache_module, table):
    csv = table.to_csv(index=False).encode()
    back = cache_module.read_uploaded_table("t.csv", csv)
    assert len(back) == len(table) and str(back["step"].dtype) == "Int64"
    with pytest.raises(da.DoraAnalysisError, match="not a dora-analysis table"):
        cache_module.read_uploaded_table("x.csv", b"a,b\n1,2\n")
    with pytest.raises(da.DoraAnalysisError, match="not a table"):
        cache_module.read_uploaded_table("x.xlsx", b"")


def test_cache_key_follows_file_identity(cache_module, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"1234")
    before = cache_module.file_identity(str(tmp_path))
    f.write_bytes(b"12345")
    assert cache_module.file_identity(str(tmp_path)) != before
    assert cache_module.file_identity("org/model") == ("org/model",)
    dcp = tmp_path / "dcp"  # a DCP folder: .metadata and *.distcp count too
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"1")
    (dcp / "__0_0.distcp").write_bytes(b"1")
    assert len(cache_module.file_identity(str(dcp))) == 2


def test_demo_data_is_make_demo_output_else_the_committed_experiment(cache_module, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(cache_module, "DEMO_DIR", tmp_path / "nothing")
    table, source = cache_module.demo_table()
    assert source.startswith("docs/reproduction.md")
    assert set(table["method"]) == {"ft", "lora", "dora"} and table["seed"].nunique() >= 3
    demo = tmp_path / "demo"
    demo.mkdir()
    da.write_table(table[table["seed"] == 0], demo / "table.csv")
    monkeypatch.setattr(cache_module, "DEMO_DIR", demo)
    table, source = cache_module.demo_table()
    assert source == "demo data (make demo)" and set(table["seed"]) == {0}


def test_demo_button_loads_a_table(monkeypatch):
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    at = run("views/data.py")
    next(b for b in at.button if b.label == "Load the demo data").click()
    at.run()
    assert not at.exception and not at.error
    assert set(at.session_state["table"]["method"]) == {"ft", "lora", "dora"}


def adapter_files(scale: float = 0.5) -> list[tuple[str, bytes, str]]:
    """A PEFT-format LoRA adapter on the fixture's q_proj (24 × 16), as uploaded files."""
    import json

    import torch
    from safetensors.torch import save

    q = "base_model.model.model.layers.0.self_attn.q_proj"
    weights = save({f"{q}.lora_A.weight": torch.full((2, 16), scale),
                    f"{q}.lora_B.weight": torch.full((24, 2), scale)})
    config = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}).encode()
    return [("adapter_config.json", config, "application/json"),
            ("adapter_model.safetensors", weights, "application/octet-stream")]


def upload_and_run(ckpts, files):
    at = run("views/data.py")
    at.text_input[0].input(str(ckpts["base"]))
    at.file_uploader[0].set_value(files)
    next(b for b in at.button if b.label == "Run analysis").click()
    return at.run()


def test_an_uploaded_adapter_is_analysed_and_not_kept(ckpts, monkeypatch):
    import sys

    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    at = upload_and_run(ckpts, adapter_files())
    assert not at.exception and not at.error
    table = at.session_state["table"]
    assert set(table["checkpoint"]) == {"uploaded adapter"} and set(table["method"]) == {"lora"}
    folder = sys.modules[CACHE].upload_root()
    assert oct(folder.stat().st_mode & 0o777) == "0o700"  # private
    assert list(folder.iterdir()) == []  # the adapter's files are gone once analysed


@pytest.mark.parametrize("files, message", [
    ([("adapter_config.json", b"{}", "application/json"), ("run.bin", b"x", "text/plain")],
     "not run.bin"),
    ([("adapter_model.safetensors", b"x", "application/octet-stream")],
     "upload an adapter as adapter_config.json plus adapter_model.safetensors"),
])
def test_uploads_other_than_an_adapter_are_refused(ckpts, monkeypatch, files, message):
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    at = upload_and_run(ckpts, files)
    assert not at.exception and message in at.error[0].value


def test_uploads_above_the_cap_are_refused(ckpts, monkeypatch):
    import sys

    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    run("views/data.py")  # the page has imported the app's cache
    monkeypatch.setattr(sys.modules[CACHE], "upload_limit", lambda: 100)  # bytes
    at = upload_and_run(ckpts, adapter_files())
    assert "more than this dashboard takes" in at.error[0].value
    assert "table" not in at.session_state


def test_the_upload_folder_is_removed_when_the_server_exits(tmp_path):
    import subprocess
    import sys

    code = "from dora_analysis.app import cache\nprint(cache.upload_root())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "TMPDIR": str(tmp_path)}, timeout=120)
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path and folder.name.startswith("dora-dashboard-")
    assert not folder.exists()


def analyse(base, tuned: str, labels: str = ""):
    at = run("views/data.py")
    at.text_input[0].input(str(base))
    at.text_area[0].input(tuned)
    at.text_area[1].input(labels)
    next(b for b in at.button if b.label == "Run analysis").click()
    return at.run()


def test_a_line_is_one_reference_even_with_an_equals_sign(ckpts, tmp_path, monkeypatch):
    """A run folder named lr=1e-2 is a path, as on the command line (not 'label = path')."""
    import shutil

    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    run_dir = tmp_path / "sweep" / "lr=1e-2"
    shutil.copytree(ckpts["series"], run_dir)
    at = analyse(ckpts["base"], str(run_dir))
    assert not at.exception and not at.error
    table = at.session_state["table"]
    cli = da.analyze(ckpts["base"], str(run_dir), modules=("q", "v"))
    assert set(table["checkpoint"]) == set(cli["checkpoint"]) == {"lr=1e-2"}
    assert sorted(set(table["step"])) == [10, 20, 30]


@pytest.mark.parametrize("labels", ["X\nX", "X", ""])
def test_two_references_with_one_label_are_refused_as_the_cli_refuses(ckpts, tmp_path,
                                                                      monkeypatch, labels):
    """Given the same label (twice, once for all, or derived from two folders named alike),
    two series would merge into one: refused with dora-analyze's own message."""
    import shutil

    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for folder in runs:
        shutil.copytree(ckpts["series"], folder)
    given = labels.split("\n") if labels else None
    with pytest.raises(da.DoraAnalysisError) as cli:
        da.analyze(ckpts["base"], [str(r) for r in runs], labels=given)
    at = analyse(ckpts["base"], "\n".join(map(str, runs)), labels)
    assert not at.exception and [e.value for e in at.error] == [str(cli.value)]
    assert "give each a distinct --label" in str(cli.value)
    assert "table" not in at.session_state


def test_labels_count_as_on_the_command_line(ckpts, monkeypatch):
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    at = analyse(ckpts["base"], f"{ckpts['tuned']}\n{ckpts['bin']}\n{ckpts['sharded']}", "A\nB")
    assert at.error[0].value == ("--label was given 2 times for 3 tuned checkpoints; give it "
                                 "once (for all) or once per checkpoint")
    at = analyse(ckpts["base"], f"{ckpts['tuned']}\n{ckpts['series']}", "A\nB")
    assert not at.error and set(at.session_state["table"]["checkpoint"]) == {"A", "B"}


def drill_into_upload(at, ckpts, **keep):
    """The Drill-down page in the session that analysed an upload (``keep``: state to carry)."""
    drill = testing.AppTest.from_file(str(APP / "views" / "drilldown.py"), default_timeout=120)
    for key in ("table", "source", *keep):
        drill.session_state[key] = at.session_state[key]
    drill.run()
    drill.text_input(key="drilldown_base").input(str(ckpts["base"])).run()
    return drill


def test_an_uploaded_adapter_can_be_drilled_into(ckpts, monkeypatch):
    import sys

    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    at = upload_and_run(ckpts, adapter_files())
    table = at.session_state["table"]
    assert set(table["ref"]) == {next(iter(at.session_state["uploads"]))}  # upload:<digest>
    drill = drill_into_upload(at, ckpts, uploads=True)
    assert not drill.exception and not drill.error
    (chart,) = drill.get("plotly_chart")
    assert "upload:" in __import__("json").loads(chart.proto.spec)["layout"]["title"]["text"]
    row = table[table["name"] == drill.selectbox[1].value].iloc[0]
    vectors = drill.dataframe[0].value
    assert abs(vectors["delta_m"]).mean() == pytest.approx(row["delta_m"], rel=1e-9)
    assert list(sys.modules[CACHE].upload_root().iterdir()) == []  # on disk only while read


def test_a_drilled_upload_no_longer_held_says_so(ckpts, monkeypatch):
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    at = upload_and_run(ckpts, adapter_files())
    drill = drill_into_upload(at, ckpts)  # another session: the upload is not there
    assert not drill.exception
    assert "this row's adapter was uploaded" in drill.error[0].value
    assert "upload it again on the Data page" in drill.error[0].value


def test_drilldown_numbers_keep_their_digits(ckpts):
    """1 − cos ≈ 3e-4 shown with four significant digits, not as 0.0003."""
    table = da.analyze(ckpts["base"], ckpts["tuned"], modules=("q",))
    at = testing.AppTest.from_file(str(APP / "views" / "drilldown.py"), default_timeout=120)
    at.session_state["table"] = table
    at.session_state["source"] = "test"
    at.run()
    at.text_input(key="drilldown_base").input(str(ckpts["base"])).run()
    config = __import__("json").loads(at.dataframe[0].proto.columns)
    for column in ("one_minus_cos", "m0", "mt", "tangential_share"):
        assert config[column]["type_config"]["format"] == "%.4g", column
    assert config["delta_m"]["type_config"]["format"] == "%.3e"


def test_an_upload_whose_analysis_fails_is_not_held(ckpts, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    other = tmp_path / "other.safetensors"  # a base the adapter does not fit
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(7, 5)}, str(other))
    at = run("views/data.py")
    at.text_input[0].input(str(other))
    at.file_uploader[0].set_value(adapter_files())
    next(b for b in at.button if b.label == "Run analysis").click()
    at.run()
    assert not at.exception and at.error
    assert "uploads" not in at.session_state and "table" not in at.session_state


def test_analyses_across_sessions_take_turns(ckpts, monkeypatch):
    """Under load at most ANALYSES_AT_ONCE analyses run at once (each on every core); the others
    wait for a slot, and all finish."""
    import threading
    import time

    from dora_analysis.app import access
    from dora_analysis.app import cache as cache_module

    running, peak, lock, real = [0], [0], threading.Lock(), da.analyze

    def analyze(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(da, "analyze", analyze)
    readable = access.Readable
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(cache_module.analyze(
        readable(str(ckpts["base"])), readable(str(ckpts["tuned"])), f"session-{i}", "auto",
        "out", ("q",)))) for i in range(cache_module.ANALYSES_AT_ONCE + 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(threads) and peak[0] == cache_module.ANALYSES_AT_ONCE
