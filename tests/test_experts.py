"""MoE experts: per-expert rows, for fused 3-D expert tensors and per-expert modules alike."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import columns as C

transformers = pytest.importorskip("transformers")
E, HIDDEN, INTER, LAYERS = 4, 16, 24, 2


def tiny_mixtral(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=E,
        num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The same base/tuned pair twice: as transformers saves it (one module per expert) and as
    the in-memory state dict holds it (fused ``(E, out, in)`` tensors, what DCP and torchtitan
    write)."""
    root = tmp_path_factory.mktemp("moe")
    base = tiny_mixtral(0)
    tuned = tiny_mixtral(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = {}
    for label, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(root / f"{label}-hf")  # per expert: experts.N.w1/w2/w3
        fused = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(fused, str(root / f"{label}-fused.safetensors"))
        out[label] = (root / f"{label}-hf", root / f"{label}-fused.safetensors")
    return out


def test_fused_expert_tensors_give_one_row_per_expert(moe):
    table = da.analyze(moe["base"][1], moe["tuned"][1], include="experts")
    assert set(table[C.MODULE]) == {"gate_up", "down"}
    assert len(table) == LAYERS * 2 * E
    gate_up = table[table[C.MODULE] == "gate_up"]
    assert sorted(set(gate_up[C.EXPERT])) == list(range(E))
    assert set(zip(gate_up[C.ROWS], gate_up[C.COLS], strict=True)) == {(2 * INTER, HIDDEN)}
    assert (table[C.DELTA_D] > 0).all()


def test_fused_and_per_expert_layouts_agree(moe):
    """gate_up = rows of w1 then w3: its per-row means are the mean of theirs; down = w2."""
    fused = da.analyze(moe["base"][1], moe["tuned"][1], include="experts")
    split = da.analyze(moe["base"][0], moe["tuned"][0], include="experts")
    assert set(split[C.MODULE]) == {"gate", "up", "down"}
    key = [C.LAYER, C.EXPERT, C.MODULE]
    f, s = fused.set_index(key), split.set_index(key)
    for layer in range(LAYERS):
        for e in range(E):
            for col in (C.DELTA_M, C.DELTA_D):
                pair = (s.loc[(layer, e, "gate"), col] + s.loc[(layer, e, "up"), col]) / 2
                assert f.loc[(layer, e, "gate_up"), col] == pytest.approx(pair, rel=1e-12)
                assert f.loc[(layer, e, "down"), col] == pytest.approx(
                    s.loc[(layer, e, "down"), col], rel=1e-12)


def test_expert_rows_read_by_pread_equal_mmap(moe):
    mmap = da.analyze(moe["base"][1], moe["tuned"][1], include="experts", axis="both",
                      block_elements=40)
    pread = da.analyze(moe["base"][1], moe["tuned"][1], include="experts", axis="both",
                       block_elements=40, io="pread")
    assert mmap[C.DELTA_D].tolist() == pread[C.DELTA_D].tolist()
    assert mmap[C.DELTA_M].tolist() == pread[C.DELTA_M].tolist()


def test_expert_values_equal_the_maths_on_each_expert(moe):
    from safetensors.torch import load_file

    base, tuned = load_file(str(moe["base"][1])), load_file(str(moe["tuned"][1]))
    table = da.analyze(moe["base"][1], moe["tuned"][1], include="experts", axis="both")
    for _, row in table.iterrows():
        w0, wt = base[row[C.NAME]][row[C.EXPERT]], tuned[row[C.NAME]][row[C.EXPERT]]
        expect = da.compare(w0, wt, axis=row[C.AXIS])
        assert row[C.DELTA_D] == pytest.approx(expect.delta_d, rel=1e-12)
        assert row[C.DELTA_M] == pytest.approx(expect.delta_m, rel=1e-12)


def test_gpt_oss_experts_stored_in_out_are_read_per_output_channel(tmp_path):
    """GPT-OSS stores experts (E, in, out); its (E, out) bias tells the orientation."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 8, 12, generator=g)  # (E, in=8, out=12)
    wt = w0 + 0.05 * torch.randn(3, 8, 12, generator=g)
    bias = torch.zeros(3, 12)
    for label, w in (("base", w0), ("tuned", wt)):
        save_file({"model.layers.0.mlp.experts.gate_up_proj": w,
                   "model.layers.0.mlp.experts.gate_up_proj_bias": bias},
                  str(tmp_path / f"{label}.safetensors"))
    table = da.analyze(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    assert len(table) == 3 and (table[C.N_VECTORS] == 12).all()  # bias not analysed
    for _, row in table.iterrows():
        expect = da.compare(w0[row[C.EXPERT]], wt[row[C.EXPERT]], transposed=True)
        assert row[C.DELTA_D] == pytest.approx(expect.delta_d, rel=1e-12)


peft = pytest.importorskip("peft")


def tiny_gpt_oss(seed: int):
    """GPT-OSS stores its experts (E, in, out), with (E, out) biases."""
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=E,
        num_experts_per_tok=2, head_dim=8)
    return transformers.GptOssForCausalLM(cfg)


@pytest.fixture(scope="module", params=[tiny_mixtral, tiny_gpt_oss], ids=["mixtral", "gpt_oss"])
def moe_adapter(request, tmp_path_factory):
    """A PEFT LoRA on both fused expert tensors of a tiny MoE model (``target_parameters``,
    nested ParamWrappers), its base, and PEFT's own merge of it, all written by the libraries."""
    root = tmp_path_factory.mktemp("moe-lora")
    base = request.param(3)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()},
              str(root / "base.safetensors"))
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=[], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj",
                                                "mlp.experts.down_proj"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config)
        model.save_pretrained(root / "adapter")
        merged = model.merge_and_unload()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()},
              str(root / "merged.safetensors"))
    return root


def test_peft_target_parameter_adapters_merge_like_peft(moe_adapter):
    ours = da.analyze(moe_adapter / "base.safetensors", moe_adapter / "adapter", axis="both")
    ref = da.analyze(moe_adapter / "base.safetensors", moe_adapter / "merged.safetensors",
                     include=r"experts\.\w+_proj$", axis="both")
    assert set(ours[C.METHOD]) == {"lora"}
    assert set(ours[C.MODULE]) == {"gate_up", "down"} and len(ours) == len(ref) == 2 * 2 * E * 2
    key = [C.NAME, C.EXPERT, C.AXIS]
    ours, ref = ours.set_index(key).sort_index(), ref.set_index(key).sort_index()
    for col in (C.DELTA_M, C.DELTA_D):
        for got, want in zip(ours[col], ref[col], strict=True):
            assert got == pytest.approx(want, rel=1e-5)
    assert (ours[C.DELTA_D] > 0).all()
