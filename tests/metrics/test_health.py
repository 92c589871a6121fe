"""The warnings column: untrained adapters, unchanged or below-precision updates, frozen DoRA
magnitudes, non-finite weights — on adapters written by PEFT itself and on real files."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.metrics import health as h

pm = pytest.importorskip("tests.peft_models")
peft = pytest.importorskip("peft")


def peft_adapter(folder, *, use_dora: bool, train_b: bool, train_magnitude: bool = False):
    """A PEFT adapter on the tiny Llama, as initialised except for what we 'train'."""
    folder.mkdir(parents=True)
    model = pm.tiny_llama()
    save_file(pm._state(model), str(folder / "base.safetensors"))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                             use_dora=use_dora)
    peft_model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name and train_b:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            if "lora_magnitude_vector" in name and train_magnitude:
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(folder / "adapter"))
    return folder / "base.safetensors", folder / "adapter"


def tags(table) -> set[str]:
    return {t for cell in table[h.WARNINGS] for t in h.split(cell)}


def test_untrained_lora_is_flagged(tmp_path):
    base, adapter = peft_adapter(tmp_path / "a", use_dora=False, train_b=False)
    table = da.analyze(base, adapter)
    assert set(table[h.WARNINGS]) == {"lora_B_zero,unchanged"}
    trained = da.analyze(*peft_adapter(tmp_path / "b", use_dora=False, train_b=True))
    assert set(trained[h.WARNINGS]) == {""}


def test_frozen_and_trained_dora_magnitudes(tmp_path):
    frozen = da.analyze(*peft_adapter(tmp_path / "a", use_dora=True, train_b=True))
    assert set(frozen[h.WARNINGS]) == {h.MAGNITUDE_FROZEN}
    trained = da.analyze(*peft_adapter(tmp_path / "b", use_dora=True, train_b=True,
                                       train_magnitude=True))
    assert set(trained[h.WARNINGS]) == {""}
    untouched = da.analyze(*peft_adapter(tmp_path / "c", use_dora=True, train_b=False))
    # B = 0: the weights change only by the float32 rounding of PEFT's initial norms.
    for cell in untouched[h.WARNINGS]:
        assert {h.LORA_B_ZERO, h.MAGNITUDE_FROZEN} <= set(h.split(cell)) <= {
            h.LORA_B_ZERO, h.MAGNITUDE_FROZEN, h.BELOW_PRECISION_FLOOR}
    # Along the input axis too (the magnitude is per output channel: read from W0 itself).
    both = da.analyze(*peft_adapter(tmp_path / "d", use_dora=True, train_b=True), axis="in")
    assert set(both[h.WARNINGS]) == {h.MAGNITUDE_FROZEN}


def test_precision_floor_unchanged_and_non_finite(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {f"layers.{i}.mlp.up_proj.weight": torch.randn(40, 24, generator=g) for i in range(4)}
    names = list(w)
    save_file(w, str(tmp_path / "base.safetensors"))
    tuned = {
        names[0]: w[names[0]].clone(),                                   # identical
        names[1]: w[names[1]].to(torch.bfloat16),                        # only re-rounded
        names[2]: (w[names[2]] + 0.02 * torch.randn(40, 24, generator=g)).to(torch.bfloat16),
        names[3]: w[names[3]].clone(),
    }
    tuned[names[3]][5, 5] = float("inf")
    tuned = {k: v.to(torch.bfloat16) if k != names[0] else v for k, v in tuned.items()}
    tuned[names[0]] = w[names[0]].to(torch.bfloat16).float()  # stored fp32, bf16 values
    save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = da.analyze(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    got = dict(zip(table[C.NAME], table[h.WARNINGS], strict=True))
    # names[0] holds bf16 values but is stored in fp32: far above the fp32 floor, no tag.
    assert got == {names[0]: "", names[1]: h.BELOW_PRECISION_FLOOR,
                   names[2]: "", names[3]: h.NONFINITE}
    save_file({names[0]: w[names[0]].clone()}, str(tmp_path / "same.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = da.analyze(tmp_path / "base.safetensors", tmp_path / "same.safetensors")
    assert same[h.WARNINGS].tolist() == [h.UNCHANGED]


def test_floor_threshold_by_hand():
    # bf16: u = 2^-8; threshold u²/(4 ln 2) = 2.20e-5 on mean ‖Δw‖²/‖w0‖².
    u = h.unit_roundoff(torch.bfloat16)
    assert u == 2.0**-8 and h.unit_roundoff("float32") == 2.0**-24 and h.unit_roundoff("F8") == 0
    sq0 = torch.tensor([1.0, 4.0], dtype=torch.float64)
    at = u * u / (4 * 0.6931471805599453)
    assert h.below_precision_floor(sq0, sq0 * at, u)
    assert not h.below_precision_floor(sq0, sq0 * at * 1.01, u)


def test_split_reads_cells():
    assert h.split("a,b") == ["a", "b"] and h.split("") == [] and h.split(float("nan")) == []


def test_magnitude_only_dora_is_not_untrained(tmp_path):
    """A DoRA module whose magnitude trained while lora_B stayed zero (magnitude-only, paper
    Table 6; dora-train --magnitude-only) changed its weights: no lora_B_zero, no warning."""
    table = da.analyze(*peft_adapter(tmp_path / "a", use_dora=True, train_b=False,
                                     train_magnitude=True))
    assert set(table[h.WARNINGS]) == {""}
    assert (table[C.DELTA_M] > 1e-3).all()


def test_magnitude_only_modules_of_dora_train(tmp_path):
    """The same through this project's trainer: magnitude-only targets save lora_B = 0."""
    import json

    from dora_analysis.training.config import TrainConfig
    from dora_analysis.training.inject import inject_adapters
    from dora_analysis.training.loop import checkpoint_weights, peft_adapter_config

    model = pm.tiny_llama()
    save_file(pm._state(model), str(tmp_path / "base.safetensors"))
    inject_adapters(model, targets=["q_proj", "down_proj"], method="dora", rank=4, alpha=8,
                    magnitude_only=["q_proj"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # q: the magnitude only; down: magnitude and lora_B
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    config = TrainConfig(method="dora", targets=("q_proj", "down_proj"), rank=4, alpha=8,
                         magnitude_only=("q_proj",), output=tmp_path / "out")
    (tmp_path / "adapter").mkdir()
    save_file(checkpoint_weights(model, config), str(tmp_path / "adapter" /
                                                     "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps(peft_adapter_config(config)))
    table = da.analyze(tmp_path / "base.safetensors", tmp_path / "adapter")
    q = table[table[C.MODULE] == "q"]
    assert len(q) == 2 and set(q[h.WARNINGS]) == {""} and (q[C.DELTA_M] > 1e-4).all()
