"""Adapters merged as read: parity with PEFT's own merge, closed form vs materialised B·A."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.io.open import open_checkpoint

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


@pytest.mark.parametrize("name", list(pm.CASES))
@pytest.mark.parametrize("closed_form", [True, False])
def test_adapter_agrees_with_peft_merge_and_unload(cases, name, closed_form):
    case = cases[name]
    ours = da.analyze(case.base, case.adapter, axis="both", closed_form=closed_form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = da.analyze(case.base, case.merged, axis="both")
    assert set(ours[C.METHOD]) == {case.method}
    assert_tables_agree(ours, ref)
    changed = ref[(ref[C.DELTA_D] > 1e-9) | (ref[C.DELTA_M] > 1e-9)]
    assert set(changed[C.NAME]) == set(ours[C.NAME])  # every changed matrix, nothing else


def test_closed_form_matches_materialised_merge_tightly(cases):
    for name in ("lora", "dora", "gpt2_dora", "conv_dora", "embedding"):
        case = cases[name]
        closed = da.analyze(case.base, case.adapter, closed_form=True)
        full = da.analyze(case.base, case.adapter, closed_form=False)
        assert_tables_agree(closed, full, rel=1e-9)


def test_merged_dora_rows_have_the_magnitude_as_norm(cases):
    case = cases["dora"]
    with open_checkpoint(case.base) as base:
        src = open_checkpoint(case.adapter, base=base)
        adapter = load_file(str(case.adapter / "adapter_model.safetensors"))
        for module in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
            merged = src.get_tensor(module + ".weight")
            m = adapter[f"base_model.model.{module}.lora_magnitude_vector"].double()
            assert torch.allclose(merged.norm(dim=1), m, rtol=1e-12)


def test_conv1d_dora_magnitude_is_per_output_column(cases):
    case = cases["gpt2_dora"]
    with open_checkpoint(case.base) as base:
        src = open_checkpoint(case.adapter, base=base)
        merged = src.get_tensor("transformer.h.0.attn.c_attn.weight")  # stored (in=32, out=96)
        ref = load_file(str(case.merged))["transformer.h.0.attn.c_attn.weight"].double()
        assert merged.shape == (32, 96)
        assert torch.allclose(merged, ref, atol=1e-6)


def test_rank_and_alpha_patterns_are_honoured(cases):
    case = cases["patterns"]
    with open_checkpoint(case.base) as base:
        src = open_checkpoint(case.adapter, base=base)
        v = src.targets["model.layers.0.self_attn.v_proj.weight"][0]
        down = src.targets["model.layers.0.mlp.down_proj.weight"][0]
        q = src.targets["model.layers.0.self_attn.q_proj.weight"][0]
    assert (v.rank, v.scale) == (2, 8 / 2)
    assert (down.rank, down.scale) == (4, 32 / 4)
    assert (q.rank, q.scale) == (4, 8 / 4)


def test_rslora_scaling(cases):
    with open_checkpoint(cases["rslora"].base) as base:
        src = open_checkpoint(cases["rslora"].adapter, base=base)
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
