"""analyze(): the tidy table on real (tiny) checkpoints of every local layout."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.errors import (
    ConfigError,
    NonFiniteWeightWarning,
    TensorMismatchError,
    UnmatchedTensorsWarning,
)
from dora_analysis.io.keys import stored_in_out
from tests.common import LAYERS, llama_state, perturb

SPEC_COLUMNS = ["checkpoint", "method", "step", "name", "layer", "module", "rows", "cols", "axis",
                "delta_m", "delta_d", "zero_vectors"]
MATRICES_PER_CKPT = 2 + 7 * LAYERS  # embed_tokens, lm_head, 7 projections per layer


def test_table_has_the_contract_columns_and_one_row_per_matrix(ckpts):
    table = da.analyze(ckpts["base"], ckpts["tuned"])
    assert list(table.columns[: len(SPEC_COLUMNS)]) == SPEC_COLUMNS
    assert len(table) == MATRICES_PER_CKPT
    assert set(table[C.AXIS]) == {"out"}
    assert (table[C.CHECKPOINT] == "tuned").all() and (table[C.METHOD] == "unknown").all()
    assert table[C.STEP].isna().all()
    assert "model.rotary.position_ids" not in set(table[C.NAME])  # int buffer, not a weight
    assert not any(n.endswith("layernorm.weight") for n in table[C.NAME])  # 1-D
    down = table[table[C.NAME] == "model.layers.2.mlp.down_proj.weight"].iloc[0]
    assert (down[C.LAYER], down[C.MODULE], down[C.ROWS], down[C.COLS]) == (2, "down", 16, 40)
    assert down[C.N_VECTORS] == 16


def test_values_match_the_maths_on_loaded_tensors(ckpts):
    base, tuned = load_file(str(ckpts["base"])), load_file(str(ckpts["tuned"]))
    table = da.analyze(ckpts["base"], ckpts["tuned"], axis="both", block_elements=100)
    for _, row in table.iterrows():
        expect = da.compare(base[row[C.NAME]], tuned[row[C.NAME]], axis=row[C.AXIS],
                            transposed=stored_in_out(row[C.NAME]))
        assert row[C.DELTA_M] == pytest.approx(expect.delta_m, rel=1e-12)
        assert row[C.DELTA_D] == pytest.approx(expect.delta_d, rel=1e-12)


def test_every_local_layout_gives_the_same_table(ckpts):
    ref = da.analyze(ckpts["base"], ckpts["tuned"])
    for layout in ("sharded", "bin"):
        other = da.analyze(ckpts["base"], ckpts[layout])
        assert other[C.DELTA_D].tolist() == ref[C.DELTA_D].tolist()
        assert other[C.DELTA_M].tolist() == ref[C.DELTA_M].tolist()


def test_io_backends_agree(ckpts):
    mmap = da.analyze(ckpts["base"], ckpts["sharded"], axis="both", block_elements=64)
    pread = da.analyze(ckpts["base"], ckpts["sharded"], axis="both", block_elements=64, io="pread")
    assert pread[C.DELTA_D].tolist() == mmap[C.DELTA_D].tolist()
    assert pread[C.DELTA_M].tolist() == mmap[C.DELTA_M].tolist()


def test_series_folder_gives_steps(ckpts):
    table = da.analyze(ckpts["base"], ckpts["series"])
    assert sorted(table[C.STEP].unique().tolist()) == [10, 20, 30]
    assert set(table[C.CHECKPOINT]) == {"run"}
    assert len(table) == 3 * MATRICES_PER_CKPT
    by_step = table.groupby(C.STEP)[C.DELTA_D].mean()
    assert by_step[10] < by_step[20] < by_step[30]  # noise grows with the step


def test_single_step_folders_join_one_series(ckpts):
    steps = [ckpts["series"] / f"checkpoint-{s}" for s in (10, 30)]
    table = da.analyze(ckpts["base"], steps)
    assert set(table[C.CHECKPOINT]) == {"run"} and sorted(set(table[C.STEP])) == [10, 30]


def test_labels_methods_and_filters(ckpts):
    table = da.analyze(ckpts["base"], [ckpts["tuned"], ckpts["sharded"]], labels=["FT", "again"],
                       methods=["ft", "ft"], modules=("q", "v"), axis="in")
    assert set(table[C.CHECKPOINT]) == {"FT", "again"}
    assert set(table[C.METHOD]) == {"ft"} and set(table[C.MODULE]) == {"q", "v"}
    assert len(table) == 2 * 2 * LAYERS and set(table[C.AXIS]) == {"in"}
    q = table[table[C.MODULE] == "q"].iloc[0]
    assert q[C.N_VECTORS] == q[C.COLS] == 16
    sub = da.analyze(ckpts["base"], ckpts["tuned"], include=r"layers\.1\.")
    assert set(sub[C.LAYER]) == {1}


def test_config_object_and_keywords_are_exclusive(ckpts):
    with pytest.raises(ConfigError):
        da.analyze(ckpts["base"], ckpts["tuned"], config=da.AnalysisConfig(), axis="in")


@pytest.mark.parametrize("kwargs, match", [
    ({"axis": "rows"}, "axis"),
    ({"include": "("}, "regular expression"),
    ({"modules": ("zz",)}, "module kinds present"),
    ({"labels": ["a", "b"]}, "--label"),
    ({"methods": ["peft"]}, "--method"),
])
def test_bad_settings(ckpts, kwargs, match):
    with pytest.raises(da.DoraAnalysisError, match=match):
        da.analyze(ckpts["base"], ckpts["tuned"], **kwargs)


def test_duplicate_labels_are_refused(ckpts):
    with pytest.raises(ConfigError, match="distinct --label"):
        da.analyze(ckpts["base"], [ckpts["tuned"], ckpts["tuned"]])


def test_all_shape_mismatches_reported_at_once(ckpts, tmp_path):
    state = load_file(str(ckpts["tuned"]))
    q = "model.layers.0.self_attn.q_proj.weight"
    state[q] = state[q].T.contiguous()  # non-square: a transposed weight is a shape mismatch
    state["model.embed_tokens.weight"] = torch.zeros(51, 16)  # resized vocabulary
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TensorMismatchError) as err:
        da.analyze(ckpts["base"], tmp_path / "bad.safetensors")
    assert len(err.value.problems) == 2
    assert "(transposed?)" in str(err.value) and "embed_tokens" in str(err.value)
    with pytest.warns(UnmatchedTensorsWarning, match="2 tensor"):
        table = da.analyze(ckpts["base"], tmp_path / "bad.safetensors", skip_mismatched=True)
    assert len(table) == MATRICES_PER_CKPT - 2


def test_no_common_names(ckpts, tmp_path):
    save_file({"other.weight": torch.ones(3, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TensorMismatchError, match="no weight matrix in common"):
        da.analyze(ckpts["base"], tmp_path / "other.safetensors")


def test_prefixed_names_and_extra_tensors_align(ckpts, tmp_path):
    state = {f"base_model.model.{k}": v for k, v in load_file(str(ckpts["tuned"])).items()}
    state["base_model.model.score.weight"] = torch.ones(2, 16)
    save_file(state, str(tmp_path / "prefixed.safetensors"))
    with pytest.warns(UnmatchedTensorsWarning, match="score.weight"):
        table = da.analyze(ckpts["base"], tmp_path / "prefixed.safetensors")
    assert len(table) == MATRICES_PER_CKPT
    assert table[C.TUNED_NAME].str.startswith("base_model.model.").all()
    assert not table[C.NAME].str.startswith("base_model").any()


def test_non_finite_weights_are_named_and_excluded(ckpts, tmp_path):
    state = load_file(str(ckpts["tuned"]))
    v = "model.layers.1.self_attn.v_proj.weight"
    state[v][2, 5] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.warns(NonFiniteWeightWarning, match="v_proj"):
        table = da.analyze(ckpts["base"], tmp_path / "nan.safetensors")
    row = table[table[C.NAME] == v].iloc[0]
    assert row[C.NONFINITE_VECTORS] == 1 and row[C.N_VECTORS] == 8
    assert row[C.DELTA_D] == row[C.DELTA_D]  # not NaN: the other 7 rows still count
    summary = da.correlate(table)
    assert summary.loc[summary[C.MODULE] == "v", C.N].item() == LAYERS - 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stored_dtypes_agree_with_float64_reference(tmp_path, dtype):
    base = llama_state(3, dtype=dtype)
    tuned = perturb(base, 1e-3, seed=4)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    table = da.analyze(tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    assert set(table[C.DTYPE]) == {str(dtype).removeprefix("torch.")}
    for _, row in table.iterrows():
        a, b = base[row[C.NAME]].double(), tuned[row[C.NAME]].double()
        if stored_in_out(row[C.NAME]):  # embedding: output channels are columns
            a, b = a.T, b.T
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)  # float64 reference
        assert row[C.DELTA_D] == pytest.approx(float((1 - cos).mean()), rel=1e-5, abs=1e-12)
        dm = float((b.norm(dim=1) - a.norm(dim=1)).abs().mean())
        assert row[C.DELTA_M] == pytest.approx(dm, rel=1e-5, abs=1e-12)


def test_gpt2_conv1d_weights_use_output_channels(tmp_path):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 36, generator=g)  # Conv1D c_attn: stored (in=12, out=36)
    wt = w0 + 0.1 * torch.randn(12, 36, generator=g)
    save_file({"transformer.h.0.attn.c_attn.weight": w0}, str(tmp_path / "b.safetensors"))
    save_file({"transformer.h.0.attn.c_attn.weight": wt}, str(tmp_path / "t.safetensors"))
    row = da.analyze(tmp_path / "b.safetensors", tmp_path / "t.safetensors").iloc[0]
    assert (row[C.MODULE], row[C.ROWS], row[C.COLS], row[C.N_VECTORS]) == ("qkv", 12, 36, 36)
    assert row[C.DELTA_D] == pytest.approx(da.compare(w0.T, wt.T).delta_d, rel=1e-12)


def test_embeddings_have_one_vector_per_dimension_as_in_peft(ckpts):
    table = da.analyze(ckpts["base"], ckpts["tuned"], axis="both")
    emb = table[table[C.NAME] == "model.embed_tokens.weight"].set_index(C.AXIS)
    assert (emb.loc["out", C.ROWS], emb.loc["out", C.COLS]) == (50, 16)
    assert emb.loc["out", C.N_VECTORS] == 16 and emb.loc["in", C.N_VECTORS] == 50
    head = table[table[C.NAME] == "lm_head.weight"].set_index(C.AXIS)
    assert head.loc["out", C.N_VECTORS] == 50  # a Linear (vocab, dim): rows are outputs


def test_quantized_weights_are_refused_by_name(tmp_path, ckpts):
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4, dtype=torch.uint8)},
              str(tmp_path / "q.safetensors"))
    with pytest.raises(da.DoraAnalysisError, match="q_proj.weight.*quantized"):
        da.analyze(ckpts["base"], tmp_path / "q.safetensors")


def test_uncached_hub_reference_offline(ckpts):
    with pytest.raises(da.DoraAnalysisError, match="not in the local cache.*HF_HUB_OFFLINE"):
        da.analyze(ckpts["base"], "some-org/some-model")


def test_inputs_are_never_modified(ckpts):
    before = {p: p.read_bytes() for p in (ckpts["base"], ckpts["tuned"])}
    da.analyze(ckpts["base"], ckpts["tuned"], axis="both")
    assert all(p.read_bytes() == data for p, data in before.items())


def test_table_serialises_losslessly(ckpts, tmp_path):
    table = da.analyze(ckpts["base"], ckpts["series"])
    for suffix in (".csv", ".json", ".parquet"):
        back = da.read_table(da.write_table(table, tmp_path / f"t{suffix}"))
        assert back[C.STEP].tolist() == table[C.STEP].tolist()
        assert back[C.DELTA_D].tolist() == pytest.approx(table[C.DELTA_D].tolist(), rel=1e-15)
    records = json.loads((tmp_path / "t.json").read_text())
    assert records[0][C.STEP] == 10 and records[0][C.CHECKPOINT] == "run"


# -- issue 21, items 3, 11, 13: every input checked before work, strings never read letter by letter
def _q_adapter(folder):
    """A PEFT-layout adapter of layer 0's q_proj only (r = 2)."""
    folder.mkdir()
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    save_file({f"{q}.lora_A.weight": torch.randn(2, 16, generator=g),
               f"{q}.lora_B.weight": torch.randn(24, 2, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    return folder


@pytest.mark.parametrize("modules, kinds", [
    ("down", {"down"}),  # once the o matrices: "d", "o", "w", "n"
    ("q, v", {"q", "v"}),
    (["q,v"], {"q", "v"}),
    ("q_proj", {"q"}),  # a module's own name: the kind q of a LLaMA
    ("q_proj,v", {"q", "v"}),  # once v only
    (("self_attn.q_proj", "mlp.down_proj"), {"q", "down"}),  # a tail of the module's path
    ("lm_head", {"lm_head"}),
])
def test_modules_are_kinds_or_module_names_and_a_string_is_one_list(ckpts, modules, kinds):
    table = da.analyze(ckpts["base"], ckpts["tuned"], modules=modules)
    per_kind = table[C.MODULE].value_counts().to_dict()
    assert per_kind == {k: 1 if k == "lm_head" else LAYERS for k in kinds}


@pytest.mark.parametrize("modules, named", [
    ("qkv", "qkv"),  # once q, k and v: the letters of the string
    ("q,value", "value"),  # once q alone, without a word
    (["q", "q_prj", "vv"], "q_prj, vv"),
])
def test_a_modules_entry_that_matches_nothing_is_an_error_naming_it(ckpts, modules, named):
    with pytest.raises(ConfigError, match=rf"^--modules {named}: no module of .*base.safetensors "
                                          r"has that kind or name; module kinds present: down, "
                                          r"embed_tokens, gate, k, lm_head, o, q, up, v"):
        da.analyze(ckpts["base"], ckpts["tuned"], modules=modules)


def test_a_modules_entry_no_checkpoint_holds_is_named_in_a_warning(ckpts, tmp_path):
    adapter = _q_adapter(tmp_path / "q_only")
    with pytest.warns(UnmatchedTensorsWarning, match=r"^--modules k: no rows; no tuned checkpoint "
                                                     r"holds such a matrix \(an adapter holds "
                                                     r"only .*kinds analysed: q$"):
        table = da.analyze(ckpts["base"], adapter, modules="q,k")  # k is unchanged, not missing
    assert set(table[C.MODULE]) == {"q"}
    with pytest.warns(UnmatchedTensorsWarning, match=r"^--modules q: .*or --include leaves them "
                                                     r"out\); kinds analysed: v$"):
        da.analyze(ckpts["base"], ckpts["tuned"], modules="q,v", include="v_proj")


@pytest.mark.parametrize("kwargs, match", [
    ({"modules": 3}, r"--modules takes names, as one comma-separated string or a list"),
    ({"modules": ["q", 3]}, r"--modules takes names \(strings\)"),
    ({"modules": " , "}, "--modules needs at least one module kind"),
    ({"metrics": ["spectrum", None]}, r"metrics takes names \(strings\)"),
    ({"metrics": "spectrum,colour"}, r"unknown metric\(s\) colour"),
    ({"metric_settings": "intruder_k"}, r"metric_settings takes \(name, value\) pairs"),
    ({"include": ["q_proj"]}, "--include takes one regular expression"),
    ({"axis": ["out"]}, "--axis must be one of out, in, both, got"),
    ({"io": None}, "--io must be one of"),
    ({"skip_mismatched": "no"}, "skip_mismatched must be True or False, got 'no'"),
    ({"lora_alpha": "8"}, "--lora-alpha must be a positive number, got '8'"),
    ({"lora_alpha": float("inf")}, "--lora-alpha must be a positive number"),
    ({"block_elements": 1024.0}, "block_elements must be a positive whole number"),
    ({"adapter_base": ["a", "b"]}, "--adapter-base takes one checkpoint reference"),
    ({"labels": [1]}, r"--label takes a string or a list of strings, got \[1\]"),
    ({"methods": {"ft": 1}}, "--method takes a string or a list of strings"),
    ({"methods": "lora,dora"}, "--method must be one of"),  # one method, never its letters
])
def test_every_analyze_argument_is_checked_before_any_work(tmp_path, kwargs, match):
    # a base that does not exist: the argument is refused before any file is looked at
    missing = tmp_path / "nothing-here"
    with pytest.raises(ConfigError, match=match):
        da.analyze(missing, missing, **kwargs)


def test_strings_where_lists_are_taken_mean_one_list(ckpts):
    table = da.analyze(ckpts["base"], str(ckpts["tuned"]), labels="FT", methods="ft",
                       metrics="spectrum", modules="q",
                       metric_settings={"amplification_rank": 2})
    assert set(table[C.CHECKPOINT]) == {"FT"} and set(table[C.METHOD]) == {"ft"}
    assert table["amplification"].notna().all()
    config = da.AnalysisConfig(modules="q,v", metrics="spectrum, intruders",
                               adapter_base=ckpts["base"])
    assert (config.modules, config.metrics) == (("q", "v"), ("spectrum", "intruders"))
    assert config.adapter_base == str(ckpts["base"])
    assert da.AnalysisConfig.from_settings(metrics="spectrum").metrics == ("spectrum",)
    by_module = da.correlate(table, by="module")  # one column, not "m", "o", "d" …
    assert list(by_module.columns[:1]) == ["module"] and by_module["n"].tolist() == [LAYERS]
    with pytest.raises(ConfigError, match="by takes column names"):
        da.correlate(table, by=[C.MODULE, 3])
    with pytest.raises(ConfigError, match="n_boot must be a whole number"):
        da.correlate(table, n_boot=2.5)
    with pytest.raises(ConfigError, match="name must be one parameter name"):
        da.matrix_detail(ckpts["base"], ckpts["tuned"], ["model.layers.0.self_attn.q_proj"])


#: Every metric setting with values its declaration refuses (a new setting must be added here).
BAD_SETTINGS = {
    "amplification_rank": [0, -5, 2.5, True, "16"],
    "intruder_k": [0, -1, 1.0, "10"],
    "intruder_eps": [0, 0.0, 1.5, float("nan"), True, "0.5"],
    "device": ["tpu", "cuda:x", "cpu:0", 0],
    "svd_cache": [3, ["folder"]],
    "sparsity_tol": [-1e-5, float("nan"), float("inf"), True, "1e-5"],
    "drift_k": [0, -3, 2.0, "16"],
}


def test_every_metric_setting_declares_its_valid_values():
    from dora_analysis import metrics

    assert set(BAD_SETTINGS) == set(metrics.settings())
    for setting in metrics.settings().values():
        assert setting.validate(setting.default) == setting.default


@pytest.mark.parametrize("name, value", [(n, v) for n, values in BAD_SETTINGS.items()
                                         for v in values])
def test_a_metric_setting_out_of_range_is_refused_naming_the_flag(tmp_path, name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"^{flag} must be .*, got {re.escape(repr(value))}$"):
        da.analyze(tmp_path / "missing", tmp_path / "missing", spectrum=True, intruders=True,
                   **{name: value})


def test_amplification_rank_zero_was_nan_and_is_now_an_error(ckpts):
    with pytest.raises(ConfigError, match="^--amplification-rank must be a positive whole "
                                          "number, got 0$"):
        da.analyze(ckpts["base"], ckpts["tuned"], spectrum=True, amplification_rank=0)
    ok = da.analyze(ckpts["base"], ckpts["tuned"], modules="q", spectrum=True,
                    amplification_rank=1, intruders=True, intruder_eps=1)
    assert ok["amplification"].notna().all() and ok["intruders"].notna().all()


def test_the_trainer_callback_reads_a_modules_string_as_one_list():
    pytest.importorskip("transformers")
    from dora_analysis.integrations.transformers import DoraAnalysisCallback

    assert DoraAnalysisCallback(modules="q,v").config.modules == ("q", "v")
    with pytest.raises(ConfigError, match="--amplification-rank must be a positive whole"):
        DoraAnalysisCallback(spectrum=True, amplification_rank=0)
