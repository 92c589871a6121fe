"""compare_runs and --cross-run on real files: the table's values are the array functions' on the
stored ΔW, the invariants hold, adapters' closed forms agree with their merged weights, and bad
input is one error naming every problem."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.errors import ConfigError, TensorMismatchError, UnmatchedTensorsWarning
from dora_analysis.metrics.similarity import (
    mask_jaccard,
    sign_conflict,
    subspace_similarity,
    update_cosine,
)
from dora_analysis.metrics.sparsity import unchanged_mask
from tests.common import llama_state, perturb


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A bf16 base, two runs of it, a copy of the first, and a float64 run that is the first's
    update negated."""
    root = tmp_path_factory.mktemp("runs")
    base = llama_state(0, torch.bfloat16)
    a, b = perturb(base, 0.01, seed=1), perturb(base, 0.01, seed=2)
    negated = {k: (2 * v.double() - a[k].double()) if v.is_floating_point() else v
               for k, v in base.items()}
    for name, state in (("base", base), ("a", a), ("b", b), ("copy", a), ("neg", negated)):
        save_file(state, str(root / f"{name}.safetensors"))
    return {name: root / f"{name}.safetensors" for name in ("base", "a", "b", "copy", "neg")} | {
        "states": {"base": base, "a": a, "b": b}}


def test_the_columns_are_the_array_functions_on_the_stored_update(runs):
    cross = da.compare_runs(runs["base"], [runs["a"], runs["b"]], labels=["A", "B"],
                            modules="q,down", k=4, trim=0.3)
    assert list(cross.columns) == list(C.CROSS_RUN_COLUMNS)
    assert set(cross[C.MODULE]) == {"q", "down"} and len(cross) == 6  # 3 layers × 2 kinds
    assert set(zip(cross[C.RUN_A], cross[C.RUN_B], strict=True)) == {("A", "B")}
    assert set(cross[C.BASE]) == {str(runs["base"])}
    states = runs["states"]
    for _, row in cross.iterrows():
        w0, wa, wb = (states[s][row[C.NAME]] for s in ("base", "a", "b"))
        da_, db = (wa.double() - w0.double()).numpy(), (wb.double() - w0.double()).numpy()
        assert row[C.UPDATE_COSINE] == update_cosine(da_, db)
        assert row[C.SUBSPACE_SIMILARITY] == pytest.approx(subspace_similarity(da_, db, 4),
                                                           rel=1e-12)
        assert row[C.SIGN_CONFLICT] == sign_conflict(da_, db, 0.3)
        assert row[C.MASK_JACCARD] == mask_jaccard(~unchanged_mask(w0, wa),
                                                   ~unchanged_mask(w0, wb))
        assert row[C.SUBSPACE_K] == 4


def test_a_run_against_itself_and_against_its_negation(runs):
    cross = da.compare_runs(runs["base"], [runs["a"], runs["copy"], runs["neg"]],
                            labels=["a", "copy", "neg"], modules="v,up")
    same = cross[(cross[C.RUN_A] == "a") & (cross[C.RUN_B] == "copy")]
    assert (same[C.UPDATE_COSINE] == 1.0).all() and (same[C.SIGN_CONFLICT] == 0.0).all()
    assert np.allclose(same[C.SUBSPACE_SIMILARITY], 1.0, atol=1e-12)
    assert (same[C.MASK_JACCARD] == 1.0).all()
    neg = cross[(cross[C.RUN_A] == "a") & (cross[C.RUN_B] == "neg")]
    assert np.allclose(neg[C.UPDATE_COSINE], -1.0, atol=1e-15)
    assert (neg[C.SIGN_CONFLICT] == 1.0).all() and (neg[C.MASK_JACCARD] == 1.0).all()
    assert np.allclose(neg[C.SUBSPACE_SIMILARITY], 1.0, atol=1e-12)


def test_adapters_closed_forms_agree_with_their_merged_weights(tmp_path):
    """Two LoRA runs (PEFT, float64) as adapters (factors) and as merge_and_unload weights
    (dense): the same table, up to the rounding of the merged float64 weights."""
    peft = pytest.importorskip("peft")
    from tests.peft_models import make_case, tiny_llama

    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    cases = [make_case(tmp_path, f"run{s}", tiny_llama, config, seed=s, dtype=torch.float64)
             for s in (0, 1)]
    assert peft is not None
    base = cases[0].base
    factors = da.compare_runs(base, [c.adapter for c in cases], labels=["x", "y"])
    merged = da.compare_runs(base, [c.merged for c in cases], labels=["x", "y"],
                             modules="q,down")  # the merged weights hold every matrix
    assert len(factors) == len(merged) == 4
    for col in (C.UPDATE_COSINE, C.SUBSPACE_SIMILARITY):
        np.testing.assert_allclose(factors[col], merged[col], rtol=1e-9)
    np.testing.assert_array_equal(factors[C.SIGN_CONFLICT], merged[C.SIGN_CONFLICT])
    np.testing.assert_array_equal(factors[C.MASK_JACCARD], merged[C.MASK_JACCARD])
    assert (factors[C.SUBSPACE_K] == 4).all()  # k = 16 clamped to the adapters' rank
    mixed = da.compare_runs(base, [cases[0].adapter, cases[0].merged], labels=["ad", "mg"])
    np.testing.assert_allclose(mixed[C.UPDATE_COSINE], 1.0, atol=1e-12)


def test_k_beyond_the_rank_gives_one_note(tmp_path, caplog):
    pytest.importorskip("peft")
    from tests.peft_models import make_case, tiny_llama

    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    cases = [make_case(tmp_path, f"r{s}", tiny_llama, config, seed=s) for s in (0, 1)]
    with caplog.at_level(logging.INFO, logger="dora_analysis"):
        cross = da.compare_runs(cases[0].base, [c.adapter for c in cases], ["r0", "r1"], k=16)
    notes = [r.getMessage() for r in caplog.records if "cross-run-k" in r.getMessage()]
    assert notes == ["--cross-run-k 16 is more than the rank of ΔW on 4 of 4 rows (k used: 2; "
                     "column subspace_k): subspace_similarity is over the top min(k, ranks) "
                     "vectors"]
    assert (cross[C.SUBSPACE_K] == 2).all()


def test_a_series_is_compared_at_its_last_step(ckpts, caplog):
    with caplog.at_level(logging.INFO, logger="dora_analysis"):
        cross = da.compare_runs(ckpts["base"], [ckpts["series"], ckpts["tuned"]],
                                labels=["run", "tuned"], modules="q")
    assert "run run is a series of 3 checkpoints: its last step (30) is compared" in caplog.text
    last = da.compare_runs(ckpts["base"], [ckpts["series"] / "checkpoint-30", ckpts["tuned"]],
                           labels=["run", "tuned"], modules="q")
    pd.testing.assert_frame_equal(cross.drop(columns=C.BASE), last.drop(columns=C.BASE))


def test_bad_input_is_one_error_naming_every_problem(runs, tmp_path):
    with pytest.raises(ConfigError, match="compares two runs or more; got 1"):
        da.compare_runs(runs["base"], [runs["a"]])
    with pytest.raises(ConfigError, match="compares two runs or more; got 1"):
        da.compare_runs(runs["base"], str(runs["a"]))
    with pytest.raises(ConfigError, match="--cross-run-k must be a positive whole number"):
        da.compare_runs(runs["base"], [runs["a"], runs["b"]], k=0)
    with pytest.raises(ConfigError, match=r"--cross-run-trim must be a number in \(0, 1\]"):
        da.compare_runs(runs["base"], [runs["a"], runs["b"]], trim=0.0)
    # runs of another base: every mismatched tensor of every run, in one error
    other = {k: torch.randn(v.shape[0] + 1, *v.shape[1:]) if v.dim() == 2 else v
             for k, v in llama_state(1).items() if "layers.0." in k or "layers.1." in k}
    save_file(other, str(tmp_path / "other.safetensors"))
    save_file(other, str(tmp_path / "other2.safetensors"))
    with pytest.raises(TensorMismatchError) as err:
        da.compare_runs(runs["base"], [runs["a"], tmp_path / "other.safetensors",
                                       tmp_path / "other2.safetensors"], modules="q,k")
    assert len(err.value.problems) == 8  # 2 runs × 2 layers × q, k
    assert all(str(tmp_path / "other2.safetensors") in p or str(tmp_path / "other.safetensors")
               in p for p in err.value.problems)
    # runs that change no matrix in common
    only_q = {k: v for k, v in runs["states"]["a"].items() if "q_proj" in k}
    only_v = {k: v for k, v in runs["states"]["b"].items() if "v_proj" in k}
    save_file(only_q, str(tmp_path / "q.safetensors"))
    save_file(only_v, str(tmp_path / "v.safetensors"))
    with pytest.raises(TensorMismatchError, match="no weight matrix in common"), \
            pytest.warns(UnmatchedTensorsWarning, match="only in the base"):
        da.compare_runs(runs["base"], [tmp_path / "q.safetensors", tmp_path / "v.safetensors"],
                        modules="q,v")


def test_the_command_line_writes_the_table_and_the_heatmaps(runs, tmp_path, capsys):
    from dora_analysis.cli import main

    out, html = tmp_path / "cross.parquet", tmp_path / "report.html"
    code = main([str(runs["base"]), str(runs["a"]), str(runs["b"]), str(runs["neg"]),
                 "--label", "A", "B", "N", "--modules", "q,v", "--cross-run", str(out),
                 "--cross-run-k", "3", "--cross-run-trim", "0.5", "--html", str(html)])
    assert code == 0, capsys.readouterr().err
    cross = da.read_table(out, kind="cross_run")
    expected = da.compare_runs(runs["base"], [runs["a"], runs["b"], runs["neg"]],
                               labels=["A", "B", "N"], modules="q,v", k=3, trim=0.5)
    pd.testing.assert_frame_equal(cross, expected)
    assert len(cross) == 3 * 6
    page = html.read_text()
    for title in ("update cosine", "subspace similarity", "sign conflict", "Jaccard"):
        assert title in page
    assert f"wrote {out} (18 rows)" in capsys.readouterr().err


def test_the_command_line_refuses_one_run_before_any_work(runs, tmp_path, capsys):
    from dora_analysis.cli import main

    out = tmp_path / "cross.csv"
    assert main([str(runs["base"]), str(runs["a"]), "--cross-run", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cross-run compares two runs or more; got 1")
    assert err.count("\n") == 1 and not out.exists()
    assert main([str(runs["base"]), str(runs["a"]), str(runs["b"]), "--cross-run", str(out),
                 "--cross-run-trim", "2"]) == 2
    assert "error: --cross-run-trim must be a number in (0, 1], got 2.0" in \
        capsys.readouterr().err


def test_the_command_line_lists_every_mismatched_run_in_one_error(runs, tmp_path, capsys):
    from dora_analysis.cli import main

    other = {k: torch.randn(v.shape[0] + 1, *v.shape[1:]) if v.dim() == 2 else v
             for k, v in llama_state(1).items() if "layers.0." in k}
    paths = [tmp_path / "other.safetensors", tmp_path / "other2.safetensors"]
    for path in paths:
        save_file(other, str(path))
    out = tmp_path / "cross.csv"
    assert main([str(runs["base"]), str(runs["a"]), *map(str, paths), "--modules", "q,k",
                 "--cross-run", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 tensor(s) differ in shape: ") and err.count("\n") == 1
    for path in paths:  # every mismatch of every run: 2 runs x (q, k) of layer 0
        for module in ("q_proj", "k_proj"):
            assert f"{path}: model.layers.0.self_attn.{module}.weight: " in err
    assert not out.exists()


def test_the_command_line_notes_a_k_beyond_the_rank(runs, tmp_path, capsys):
    from dora_analysis.cli import main

    out = tmp_path / "cross.csv"
    assert main([str(runs["base"]), str(runs["a"]), str(runs["b"]), "--modules", "q,v",
                 "--cross-run", str(out), "--cross-run-k", "1000"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "cross-run-k" in line]
    assert len(notes) == 1 and notes[0].startswith("note: --cross-run-k 1000 is more than the ")
    cross = da.read_table(out, kind="cross_run")
    assert (cross[C.SUBSPACE_K] < 1000).all()
    assert (cross[C.SUBSPACE_K] == cross["name"].map(
        lambda n: min(runs["states"]["a"][n].shape))).all()


def test_the_analysis_table_names_its_base(ckpts, tmp_path):
    table = da.analyze(ckpts["base"], ckpts["tuned"], modules="q")
    assert set(table[C.BASE]) == {str(ckpts["base"])}
    da.write_table(table, tmp_path / "t.csv")
    assert set(da.read_table(tmp_path / "t.csv")[C.BASE]) == {str(ckpts["base"])}
    assert not math.isnan(table[C.DELTA_D].iloc[0])


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_the_cross_run_table_reads_back_exactly(runs, tmp_path, suffix):
    cross = da.compare_runs(runs["base"], [runs["a"], runs["b"], runs["base"]],
                            labels=["NA", "b", "base"], modules="q")  # a label like a missing value
    assert cross[C.UPDATE_COSINE].isna().any()  # the base against itself: no update
    da.write_table(cross, tmp_path / f"cross{suffix}")
    back = da.read_table(tmp_path / f"cross{suffix}", kind="cross_run")
    pd.testing.assert_frame_equal(back, cross, check_exact=True)
    with pytest.raises(da.DoraAnalysisError, match="not a dora-analysis table"):
        da.read_table(tmp_path / f"cross{suffix}")
