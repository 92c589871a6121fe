"""analyze(): the tidy table on real (tiny) checkpoints of every local layout."""

from __future__ import annotations

import json

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
