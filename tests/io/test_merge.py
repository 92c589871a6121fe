"""Adapters merged as read: parity with PEFT's own merge, closed form vs materialised B·A."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.io.open import open_checkpoint
from dora_analysis.pairs import open_tuned

pm = pytest.importorskip("tests.peft_models")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pm.make_all(tmp_path_factory.mktemp("peft"))


def assert_tables_agree(ours, ref, rel=1e-5):
    key = [C.NAME, C.AXIS]
    ref = ref.set_index(key).loc[ours.set_index(key).index]
    for col in (C.DELTA_M, C.DELTA_D):
        for got, want in zip(ours[col], ref[col], strict=True):
            tol = 1e-12 if abs(want) < 1e-7 else rel * abs(want)
            assert abs(got - want) <= tol, (col, got, want)


def assert_agrees_with_peft_merge(case, closed_form: bool, rel: float = 1e-5,
                                  changed_above: float = 1e-9) -> None:
    """The adapter read as merged gives the table of PEFT's merge_and_unload weights: every
    changed matrix, nothing else."""
    ours = da.analyze(case.base, case.adapter, axis="both", closed_form=closed_form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = da.analyze(case.base, case.merged, axis="both")
    assert set(ours[C.METHOD]) == {case.method}
    assert_tables_agree(ours, ref, rel=rel)
    changed = ref[(ref[C.DELTA_D] > changed_above) | (ref[C.DELTA_M] > changed_above)]
    assert set(changed[C.NAME]) == set(ours[C.NAME]) and len(ours) > 0


@pytest.mark.parametrize("name", list(pm.CASES))
@pytest.mark.parametrize("closed_form", [True, False])
def test_adapter_agrees_with_peft_merge_and_unload(cases, name, closed_form):
    assert_agrees_with_peft_merge(cases[name], closed_form)


def test_closed_form_matches_materialised_merge_tightly(cases):
    for name in ("lora", "dora", "gpt2_dora", "conv_dora", "embedding"):
        case = cases[name]
        closed = da.analyze(case.base, case.adapter, closed_form=True)
        full = da.analyze(case.base, case.adapter, closed_form=False)
        assert_tables_agree(closed, full, rel=1e-9)


def test_merged_dora_rows_have_the_magnitude_as_norm(cases):
    case = cases["dora"]
    with open_checkpoint(case.base) as base:
        src = open_tuned(case.adapter, base=base)
        adapter = load_file(str(case.adapter / "adapter_model.safetensors"))
        for module in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
            merged = src.get_tensor(module + ".weight")
            m = adapter[f"base_model.model.{module}.lora_magnitude_vector"].double()
            assert torch.allclose(merged.norm(dim=1), m, rtol=1e-12)


def test_conv1d_dora_magnitude_is_per_output_column(cases):
    case = cases["gpt2_dora"]
    with open_checkpoint(case.base) as base:
        src = open_tuned(case.adapter, base=base)
        merged = src.get_tensor("transformer.h.0.attn.c_attn.weight")  # stored (in=32, out=96)
        ref = load_file(str(case.merged))["transformer.h.0.attn.c_attn.weight"].double()
        assert merged.shape == (32, 96)
        assert torch.allclose(merged, ref, atol=1e-6)


def test_rank_and_alpha_patterns_are_honoured(cases):
    case = cases["patterns"]
    with open_checkpoint(case.base) as base:
        src = open_tuned(case.adapter, base=base)
        v = src.targets["model.layers.0.self_attn.v_proj.weight"][0]
        down = src.targets["model.layers.0.mlp.down_proj.weight"][0]
        q = src.targets["model.layers.0.self_attn.q_proj.weight"][0]
    assert (v.rank, v.scale) == (2, 8 / 2)
    assert (down.rank, down.scale) == (4, 32 / 4)
    assert (q.rank, q.scale) == (4, 8 / 4)


def test_rslora_scaling(cases):
    with open_checkpoint(cases["rslora"].base) as base:
        src = open_tuned(cases["rslora"].adapter, base=base)
        update = src.targets["model.layers.0.self_attn.q_proj.weight"][0]
    assert update.scale == pytest.approx(8 / 2.0)  # alpha / sqrt(r), r = 4


def test_modules_to_save_are_full_weights(cases):
    table = da.analyze(cases["modules_to_save"].base, cases["modules_to_save"].adapter)
    head = table[table[C.NAME] == "lm_head.weight"]
    assert len(head) == 1 and head[C.DELTA_D].item() > 0


def test_series_of_adapter_checkpoints(cases, tmp_path):
    """HF Trainer + PEFT writes run/checkpoint-N/ adapter folders: one series, method detected."""
    import shutil

    for step, name in ((100, "dora"), (200, "rslora")):  # same targets, different adapters
        shutil.copytree(cases[name].adapter, tmp_path / "run" / f"checkpoint-{step}")
    table = da.analyze(cases["dora"].base, tmp_path / "run")
    assert sorted(set(table[C.STEP])) == [100, 200]
    assert set(table[C.CHECKPOINT]) == {"run"} and set(table[C.METHOD]) == {"dora"}
    assert len(da.correlate(table)) == 3  # q, v, down


# --- LoRA variants and LoraConfig fields, made by PEFT in float64 ---------------------------

@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pm.make_variants(tmp_path_factory.mktemp("peft-variants"))


def _tolerance(name: str) -> float:
    if name == "kasa":  # PEFT truncates the base with a float32 SVD
        return 1e-6
    return 1e-7 if name in pm.FLOAT32_ONLY else 1e-12


@pytest.mark.parametrize("name", list(pm.VARIANT_CASES))
@pytest.mark.parametrize("closed_form", [True, False])
def test_variant_agrees_with_peft_merge_and_unload(variants, name, closed_form):
    """KaSA, BD-LoRA, trainable tokens, lora_bias, bias, VeLoRA, MonteCLoRA, MiCA, orthogonal
    init, and the tied lm_head cases: the table of the adapter read as merged equals the table of
    PEFT's merge_and_unload weights (float64: to rounding), every changed matrix and nothing
    else."""
    assert_agrees_with_peft_merge(variants[name], closed_form, rel=_tolerance(name),
                                  changed_above=1e-12)


def test_kasa_merges_into_the_truncated_base(variants):
    """KaSA is not plain s·B·A: the diagonal and the base truncation both move the result."""
    case = variants["kasa"]
    name = "model.layers.1.mlp.down_proj.weight"  # (32, 48)
    with open_checkpoint(case.base) as base:
        src = open_tuned(case.adapter, base=base)
        merged = src.get_tensor(name)
        update = src.low_rank(name)
    ref = load_file(str(case.merged))[name]
    assert torch.allclose(merged, ref, rtol=0, atol=1e-6)
    assert update.rank == 8  # r = 4 for the update, 4 for the dropped singular components
    adapter = load_file(str(case.adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.mlp.down_proj."
    plain = load_file(str(case.base))[name] + 2.0 * (
        adapter[prefix + "lora_B.weight"] @ adapter[prefix + "lora_A.weight"])
    assert (plain - ref).abs().max() > 1e-2  # what the reader used to compute


def test_tied_head_partners_read_from_one_tensor(variants):
    """A LoRA on a tied lm_head changes the shared embedding too (as PEFT merges it): both rows,
    each in its own orientation; a modules_to_save copy of the head leaves the embedding."""
    lora = da.analyze(variants["tied_lora_head"].base, variants["tied_lora_head"].adapter)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(lora[C.NAME])
    saved = da.analyze(variants["tied_head_saved"].base, variants["tied_head_saved"].adapter)
    assert "lm_head.weight" in set(saved[C.NAME])
    assert "model.embed_tokens.weight" not in set(saved[C.NAME])


def test_tied_head_with_a_lora_on_both_halves_is_refused(tmp_path, capsys):
    """ensure_weight_tying gives the embedding the head's LoRA too; PEFT 0.21–0.22's merge adds it
    twice (its merged model's outputs differ from the trained model's), so no single tuned
    weight stands for it: refused, naming both weights."""
    from dora_analysis.cli import main
    from dora_analysis.errors import TensorMismatchError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = pm.make_case(tmp_path, "ewt", pm.tied_llama,
                            {"r": 4, "lora_alpha": 8, "target_modules": ["lm_head"],
                             "ensure_weight_tying": True}, dtype=torch.float64)
    with pytest.raises(TensorMismatchError, match="share one tensor and both carry an update"):
        da.analyze(case.base, case.adapter)
    capsys.readouterr()
    assert main([str(case.base), str(case.adapter), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "lm_head.weight" in err and "model.embed_tokens.weight" in err


def test_tied_head_without_the_base_config_says_what_to_do(variants, tmp_path):
    """Without config.json nothing says lm_head is tied: the error says to put it back."""
    from dora_analysis.errors import TensorMismatchError

    case = variants["tied_lora_head"]
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(
        (case.base / "model.safetensors").read_bytes())
    with pytest.raises(TensorMismatchError, match="'lm_head' has no weight in the base.*"
                                                  "config.json"):
        da.analyze(tmp_path / "base", case.adapter)


def test_tied_full_checkpoints_have_no_missing_head(tmp_path):
    """Two tied models saved by transformers: the base's lm_head alias is the embedding, not a
    weight missing from the tuned checkpoint (no warning, no extra row)."""
    from dora_analysis.errors import UnmatchedTensorsWarning

    pm.tied_llama(0).save_pretrained(str(tmp_path / "base"))
    pm.tied_llama(1).save_pretrained(str(tmp_path / "tuned"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedTensorsWarning)
        table = da.analyze(tmp_path / "base", tmp_path / "tuned")
    assert "lm_head.weight" not in set(table[C.NAME])
    assert "model.embed_tokens.weight" in set(table[C.NAME])


def test_in_memory_variants_are_refused_not_read_as_plain_lora(variants):
    """analyze_model on a live PEFT model: a KaSA layer (base truncated, lora_diag) would read as
    plain s·B·A; it is refused by name, and the saved folder is the way to read it."""
    from dora_analysis.errors import ConfigError

    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(pm.tiny_llama().double(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], kasa_config={}))
    with pytest.raises(ConfigError, match="KasaLinearVariant layer is not read from memory"):
        da.analyze_model(model, variants["kasa"].base)
