"""Writers: formats by suffix, atomic replacement, output-path validation, the text summary."""

from __future__ import annotations

import pandas as pd
import pytest

import dora_analysis as da
from dora_analysis.atomic import atomic_write
from dora_analysis.errors import OutputError
from dora_analysis.report import format_summary, html_report
from dora_analysis.tables import check_output_path


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


@pytest.mark.parametrize("name, match", [
    ("out.xlsx", "unknown output format"),
    ("missing_dir/out.csv", "does not exist"),
])
def test_bad_output_paths(tmp_path, name, match):
    with pytest.raises(OutputError, match=match):
        check_output_path(tmp_path / name)


def test_output_may_not_overwrite_an_input(tmp_path):
    src = tmp_path / "weights.bin.csv"
    src.write_bytes(b"x")
    with pytest.raises(OutputError, match="overwrite"):
        check_output_path(src, inputs=[src])
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(OutputError, match="inside the input"):
        check_output_path(folder / "t.csv", inputs=[folder])


def test_output_path_that_is_a_folder(tmp_path):
    (tmp_path / "x.csv").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path / "x.csv")


def test_summary_text(ckpts):
    table = da.analyze(ckpts["base"], ckpts["series"], modules=("q", "v"))
    text = format_summary(table, da.correlate(table))
    assert "run  (method: unknown, steps: 10, 20, 30)" in text
    assert "Pearson r" in text and "  q " in text and "  v " in text


def test_summary_of_nothing():
    assert "no weight matrices" in format_summary(pd.DataFrame(), pd.DataFrame())


def test_summary_and_report_carry_health_warnings_and_metric_figures(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    tuned = load_file(str(ckpts["tuned"]))
    base = load_file(str(ckpts["base"]))
    frozen = {k: base[k].clone() if "q_proj" in k else v for k, v in tuned.items()}
    save_file(frozen, str(tmp_path / "half.safetensors"))
    table = da.analyze(ckpts["base"], tmp_path / "half.safetensors", labels=["half"],
                       modules=("q", "v"), spectrum=True)
    text = format_summary(table, da.correlate(table))
    assert "health checks (the warnings column):" in text
    assert ("half: tuned weights identical to the base [unchanged]: 3 row(s) "
            "(model.layers.0.self_attn.q_proj.weight, model.layers.1.self_attn.q_proj.weight, "
            "model.layers.2.self_attn.q_proj.weight)") in text
    page = html_report(table, da.correlate(table))
    assert "<h2>Health checks</h2>" in page and "[unchanged]" in page
    assert "effective_rank" in page and "tangential_fraction" in page  # metric figures
    healthy = da.analyze(ckpts["base"], ckpts["tuned"], modules=("q",))
    assert "health checks" not in format_summary(healthy, da.correlate(healthy))


@pytest.mark.parametrize("under", ["tuned.safetensors/x.csv", "tuned.safetensors/sub/x.csv"])
def test_output_under_a_file_says_so(tmp_path, under):
    (tmp_path / "tuned.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError, match=r"tuned.safetensors' is a file, not a folder"):
        check_output_path(tmp_path / under)


def test_summary_columns_line_up_with_long_module_names(ckpts):
    """``position_embeddings``, ``embed_tokensout`` and the like: every column starts where its
    header does."""
    table = da.analyze(ckpts["base"], ckpts["series"])
    long_names = {"embed_tokens": "embed_tokensout", "q": "position_embeddings"}
    table["module"] = table["module"].replace(long_names)
    lines = format_summary(table, da.correlate(table)).splitlines()
    header = next(line for line in lines if line.lstrip().startswith("module"))
    rows = [line for line in lines if line.lstrip().startswith(tuple(long_names.values()))]
    assert len(rows) == 2
    for line in (header, *rows):
        assert len(line) == len(header)  # every row as wide as the header: nothing slipped
    for title in ("n", "mean ΔM", "Pearson r", "slope"):
        end = header.index(title) + len(title)  # right-aligned under its title
        assert all(row[end - 1] != " " and row[end:end + 1] in ("", " ") for row in rows), title
