"""Adapter formats other than PEFT's (hand merges, documented), and adapter errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.errors import CheckpointFormatError, ConfigError, TensorMismatchError
from dora_analysis.io.peft_config import pattern_value

Q, DOWN = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"  # (24, 16), (16, 40)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rows_normalised(w, m):  # Eq. 5, norm per output channel (row)
    return m[:, None] * w / w.norm(dim=1, keepdim=True)


def compare_with_hand_merge(base_path, adapter, merged_state, tmp_path, **kwargs):
    """The adapter's table must equal the table of the hand-merged full weights."""
    base = load_file(str(base_path))
    full = dict(base) | {k: v.float() for k, v in merged_state.items()}
    save_file(full, str(tmp_path / "hand_merged.safetensors"))
    ours = da.analyze(base_path, adapter, axis="both", **kwargs)
    ref = da.analyze(base_path, tmp_path / "hand_merged.safetensors", axis="both")
    ref = ref.set_index([C.NAME, C.AXIS]).loc[ours.set_index([C.NAME, C.AXIS]).index]
    assert len(ours) == 2 * len(merged_state)
    for col in (C.DELTA_M, C.DELTA_D):
        assert ours[col].tolist() == pytest.approx(ref[col].tolist(), rel=1e-5, abs=1e-12)
    return ours


def test_nvlabs_official_dora(ckpts, tmp_path):
    """Official DoRA code: W' = m (W0 + (alpha/r) B A) / ||.||_row; weight_m_wdecomp is (out, 1);
    a module with only weight_m_wdecomp is magnitude-only: W' = m W0 / ||W0||_row."""
    base = load_file(str(ckpts["base"]))
    a, b, m = rand(4, 16, seed=1), rand(24, 4, seed=2) * 0.3, rand(24, seed=3).abs() + 0.5
    m_down = base[DOWN + ".weight"].norm(dim=1) * 1.1
    folder = tmp_path / "nvlabs"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "DORA", "r": 4, "lora_alpha": 8, "dora_simple": True,
         "Wdecompose_target_modules": ["down_proj"], "base_model_name_or_path": "tiny"}))
    prefix = "base_model.model."
    torch.save({prefix + Q + ".lora_A.weight": a, prefix + Q + ".lora_B.weight": b,
                prefix + Q + ".weight_m_wdecomp.weight": m[:, None],
                prefix + DOWN + ".weight_m_wdecomp.weight": m_down[:, None]},
               folder / "adapter_model.bin")
    w0 = base[Q + ".weight"].double()
    merged = {Q + ".weight": rows_normalised(w0 + 2.0 * b.double() @ a.double(), m.double()),
              DOWN + ".weight": rows_normalised(base[DOWN + ".weight"].double(), m_down.double())}
    table = compare_with_hand_merge(ckpts["base"], folder, merged, tmp_path)
    assert set(table[C.METHOD]) == {"dora"}
    down = table[(table[C.NAME] == DOWN + ".weight") & (table[C.AXIS] == "out")]
    assert down[C.DELTA_D].item() == pytest.approx(0.0, abs=1e-15)  # magnitude only


def test_torchtune_names_and_alpha(ckpts, tmp_path):
    """torchtune: lora_a/lora_b/magnitude under torchtune names; scale = alpha / rank; q/k rows
    in Meta's RoPE order, permuted for a Hugging Face base (3 heads, from its config.json)."""
    from dora_analysis.io.adapters import meta_to_hf_rows

    base_path = tmp_path / "base" / "model.safetensors"
    base_path.parent.mkdir()
    base_path.write_bytes(ckpts["base"].read_bytes())
    (base_path.parent / "config.json").write_text('{"num_attention_heads": 3}')
    base = load_file(str(base_path))
    a_q, b_q, m_q = rand(8, 16, seed=4), rand(24, 8, seed=5) * 0.2, rand(24, seed=6).abs() + 0.5
    a_d, b_d = rand(8, 40, seed=7), rand(16, 8, seed=8) * 0.2
    path = tmp_path / "adapter_0.pt"
    torch.save({"layers.0.attn.q_proj.lora_a.weight": a_q, "layers.0.attn.q_proj.lora_b.weight":
                b_q, "layers.0.attn.q_proj.magnitude": m_q,
                "layers.1.mlp.w2.lora_a.weight": a_d, "layers.1.mlp.w2.lora_b.weight": b_d}, path)
    s = 16 / 8
    b_hf, m_hf = meta_to_hf_rows(b_q, 3), meta_to_hf_rows(m_q, 3)
    merged = {
        Q + ".weight": rows_normalised(base[Q + ".weight"].double() + s * b_hf.double()
                                       @ a_q.double(), m_hf.double()),
        DOWN + ".weight": base[DOWN + ".weight"].double() + s * b_d.double() @ a_d.double(),
    }
    compare_with_hand_merge(base_path, path, merged, tmp_path, lora_alpha=16)
    with pytest.raises(ConfigError, match="--lora-alpha"):
        da.analyze(base_path, path)
    (base_path.parent / "config.json").unlink()
    with pytest.raises(CheckpointFormatError, match="Meta's RoPE order.*config.json"):
        da.analyze(base_path, path, lora_alpha=16)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_lycoris_dora_scale_on_either_axis(ckpts, tmp_path, axis):
    """LyCORIS: W = W0 + (alpha/r) up @ down, then W * dora_scale / ||W|| along the axis its
    shape names: (1, in) per input column (LyCORIS' default) or (out, 1) per output row."""
    base = load_file(str(ckpts["base"]))
    down, up = rand(4, 16, seed=9), rand(24, 4, seed=10) * 0.3
    alpha = torch.tensor(2.0)
    w = base[Q + ".weight"].double() + (2.0 / 4) * up.double() @ down.double()
    if axis == "in":
        scale = (w.norm(dim=0) * 1.05).float()[None, :]
        merged = w * (scale.double() / w.norm(dim=0, keepdim=True))
    else:
        scale = (w.norm(dim=1) * 0.95).float()[:, None]
        merged = w * (scale.double() / w.norm(dim=1, keepdim=True))
    d2, u2 = rand(2, 40, seed=11), rand(16, 2, seed=12) * 0.3  # plain LoRA, dotted name, no alpha
    state = {"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": down,
             "lora_te_model_layers_0_self_attn_q_proj.lora_up.weight": up,
             "lora_te_model_layers_0_self_attn_q_proj.alpha": alpha,
             "lora_te_model_layers_0_self_attn_q_proj.dora_scale": scale,
             DOWN + ".lora_down.weight": d2, DOWN + ".lora_up.weight": u2}
    save_file(state, str(tmp_path / "lycoris.safetensors"))
    hand = {Q + ".weight": merged,
            DOWN + ".weight": base[DOWN + ".weight"].double() + u2.double() @ d2.double()}
    table = compare_with_hand_merge(ckpts["base"], tmp_path / "lycoris.safetensors", hand,
                                    tmp_path)
    assert set(table[C.METHOD]) == {"dora"}


def write_peft_like(folder, config, tensors):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


PEFT_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
               "base_model_name_or_path": "other/model"}
GOOD = {f"base_model.model.{Q}.lora_A.weight": rand(4, 16, seed=1),
        f"base_model.model.{Q}.lora_B.weight": rand(24, 4, seed=2)}
SQUARE = {f"base_model.model.{Q}.lora_A.weight": rand(4, 24, seed=1),  # a transposed B·A fits
          f"base_model.model.{Q}.lora_B.weight": rand(24, 4, seed=2)}


def test_adapter_without_weights(ckpts, tmp_path):
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG, None)
    with pytest.raises(CheckpointFormatError, match="adapter folder without weights"):
        da.analyze(ckpts["base"], folder)


def test_broken_adapter_config(ckpts, tmp_path):
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG, GOOD)
    (folder / "adapter_config.json").write_text("{\"r\": 4,")
    with pytest.raises(CheckpointFormatError, match="broken adapter config"):
        da.analyze(ckpts["base"], folder)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(CheckpointFormatError, match="'lora_alpha' is missing"):
        da.analyze(ckpts["base"], folder)


def test_adapter_for_another_base_names_every_shape(ckpts, tmp_path):
    bad = {f"base_model.model.{Q}.lora_A.weight": rand(4, 20, seed=1),
           f"base_model.model.{Q}.lora_B.weight": rand(24, 4, seed=2),
           f"base_model.model.{DOWN}.lora_A.weight": rand(4, 40, seed=1),
           f"base_model.model.{DOWN}.lora_B.weight": rand(12, 4, seed=2),
           "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": rand(4, 16, seed=3),
           "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": rand(24, 4, seed=3)}
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG, bad)
    with pytest.raises(TensorMismatchError) as err:
        da.analyze(ckpts["base"], folder)
    msg = str(err.value)
    assert len(err.value.problems) == 3 and "other/model" in msg
    assert "adapter [24, 20] vs base" in msg and "adapter [12, 40]" in msg
    assert "layers.9.self_attn.q_proj' has no weight in the base" in msg


def test_rank_in_config_must_match_weights(ckpts, tmp_path):
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG | {"r": 8}, GOOD)
    with pytest.raises(CheckpointFormatError, match="rank 4 in its weights but r = 8"):
        da.analyze(ckpts["base"], folder)


def test_adapter_as_base_is_refused(ckpts, tmp_path):
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG, GOOD)
    with pytest.raises(CheckpointFormatError, match="is an adapter, not a base model"):
        da.analyze(folder, ckpts["tuned"])


def test_unsupported_peft_type(ckpts, tmp_path):
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG | {"peft_type": "IA3"}, GOOD)
    with pytest.raises(CheckpointFormatError, match="IA3 is not supported"):
        da.analyze(ckpts["base"], folder)


def test_pattern_matching_rule():
    assert pattern_value({"q_proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value({"layers.0.self_attn.q_proj": 2}, "model.layers.0.self_attn.q_proj",
                         8) == 2
    assert pattern_value({"q_proj": 2}, "model.layers.0.self_attn.xq_proj", 8) == 8


# --- adapters trained against a changed base (PiSSA, OLoRA, …), made by PEFT itself ------------

def _peft_base_changing_case(root, init):
    """A PEFT adapter with ``init_lora_weights=init`` on a tiny LLaMA, "trained" (factors moved),
    saved as is and converted (``path_initial_model_for_weight_conversion``); the residual base
    it was trained on and PEFT's merged weights saved next to it."""
    import warnings

    pm = pytest.importorskip("tests.peft_models")
    peft = pm.peft
    model = pm.tiny_llama()
    save_file(pm._state(model), str(root / "base.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {"astra_config": peft.tuners.lora.config.AstraConfig()} if init == "astra" else {}
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=pm.LLAMA_TARGETS,
                                 init_lora_weights=init, **extra)
        if init == "astra":  # its calibration: output activations on a few random sequences
            tokens = torch.randint(0, model.config.vocab_size, (16, 24),
                                   generator=torch.Generator().manual_seed(7))
            peft.tuners.lora.preprocess_astra(model, config, run_model=lambda: model(tokens))
        peft_model = peft.get_peft_model(model, config)
        residual = {k.replace(".base_layer", ""): v.detach().clone().contiguous()
                    for k, v in peft_model.get_base_model().state_dict().items()
                    if "lora_" not in k}
        save_file(residual, str(root / "residual.safetensors"))
        peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the
        peft_model.save_pretrained(str(root / "initial"))           # conversion's reference
        peft_model.peft_config["default"].init_lora_weights = init
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # stand-in for training: both factors move
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(str(root / "adapter"))
        peft_model.save_pretrained(str(root / "converted"),
                                   path_initial_model_for_weight_conversion=str(root / "initial"))
        save_file(pm._state(peft_model.merge_and_unload()), str(root / "merged.safetensors"))
    return root


@pytest.fixture(scope="module", params=["pissa", "olora", "astra"])
def base_changing(request, tmp_path_factory):
    return request.param, _peft_base_changing_case(tmp_path_factory.mktemp(request.param),
                                                   request.param)


def _agree(ours, ref, rel=1e-5):
    ref = ref.set_index([C.NAME, C.AXIS]).loc[ours.set_index([C.NAME, C.AXIS]).index]
    for col in (C.DELTA_M, C.DELTA_D):
        assert ours[col].tolist() == pytest.approx(ref[col].tolist(), rel=rel, abs=1e-12)


def test_base_changing_init_is_refused_with_advice(base_changing, capsys):
    from dora_analysis.cli import main

    init, root = base_changing
    with pytest.raises(ConfigError, match=rf"init_lora_weights='{init}'.*--adapter-base.*"
                                          r"path_initial_model_for_weight_conversion"):
        da.analyze(root / "base.safetensors", root / "adapter")
    assert main([str(root / "base.safetensors"), str(root / "adapter")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and init in err


def test_base_changing_adapter_with_its_base_agrees_with_peft_merge(base_changing):
    """Merged into the residual it was trained on, measured against the pre-trained weights."""
    _init, root = base_changing
    ref = da.analyze(root / "base.safetensors", root / "merged.safetensors", axis="both")
    ref = ref[(ref[C.DELTA_D] > 1e-9) | (ref[C.DELTA_M] > 1e-9)]
    ours = da.analyze(root / "base.safetensors", root / "adapter", axis="both",
                      adapter_base=str(root / "residual.safetensors"))
    assert set(ours[C.NAME]) == set(ref[C.NAME]) and len(ours) == len(ref)
    _agree(ours, ref)
    # merging into the pre-trained weights instead would be wrong: the check is not vacuous
    wrong = da.analyze(root / "base.safetensors", root / "adapter",
                       adapter_base=str(root / "base.safetensors"))
    assert wrong[C.DELTA_D].tolist() != pytest.approx(
        ref[ref[C.AXIS] == "out"].set_index(C.NAME).loc[wrong[C.NAME], C.DELTA_D].tolist(),
        rel=1e-3)


@pytest.mark.parametrize("closed_form", [True, False])
def test_converted_adapter_reads_as_plain_lora(base_changing, closed_form):
    _init, root = base_changing
    config = json.loads((root / "converted" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # rank 2r, by concatenation
    ours = da.analyze(root / "base.safetensors", root / "converted", axis="both",
                      closed_form=closed_form)
    ref = da.analyze(root / "base.safetensors", root / "merged.safetensors", axis="both")
    assert set(ours[C.METHOD]) == {"lora"}
    _agree(ours, ref, rel=1e-4)  # PEFT's float32 merge vs our float64 (rank-8 sums)


def test_inits_that_keep_the_base_are_read(ckpts, tmp_path):
    from dora_analysis.io.adapters import base_changing_init

    for init in (True, False, "gaussian", "eva", "orthogonal", "mica", "nora"):
        assert base_changing_init({"init_lora_weights": init}) is None
    for init in ("pissa", "pissa_niter_16", "olora", "corda", "astra", "loftq", "lora_ga"):
        assert base_changing_init({"init_lora_weights": init}) is not None


def test_dora_config_without_magnitudes_warns(ckpts, tmp_path):
    from dora_analysis.errors import AdapterWarning

    prefix = "base_model.model."
    folder = write_peft_like(
        tmp_path / "bridge",
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True,
         "target_modules": ["q_proj"]},
        {prefix + Q + ".lora_A.weight": rand(4, 16, seed=1),
         prefix + Q + ".lora_B.weight": rand(24, 4, seed=2)})
    with pytest.warns(AdapterWarning, match=r"adapter_model.safetensors: adapter_config.json "
                                            r"says use_dora but .* no lora_magnitude_vector"):
        table = da.analyze(ckpts["base"], folder)
    assert set(table[C.METHOD]) == {"lora"}


# --- LyCORIS DoRA as the lycoris library writes it ---------------------------------------------

@pytest.mark.parametrize("wd_on_out", [True, False])
def test_lycoris_library_dora_agrees_with_its_own_merge(tmp_path, wd_on_out):
    """``lycoris.create_lycoris(..., dora_wd=True)``: keys ``lycoris_<flat module>.lora_down/
    lora_up/alpha/dora_scale``; ``dora_scale`` is (out, 1) with ``wd_on_output`` (the default),
    (1, in) without; the reference is LyCORIS' own ``merge_to``."""
    lycoris = pytest.importorskip("lycoris")
    pm = pytest.importorskip("tests.peft_models")
    import logging

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    model = pm.tiny_llama()
    save_file(pm._state(model), str(tmp_path / "base.safetensors"))
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, algo="lora",
                                 dora_wd=True, wd_on_output=wd_on_out)
    net.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-in for training
        for name, p in net.named_parameters():
            if "lora_up" in name or "dora_scale" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    net.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float32, None)
    keys = load_file(str(tmp_path / "lycoris.safetensors"))
    scale = keys["lycoris_model_layers_0_mlp_down_proj.dora_scale"]  # down_proj: (32, 48)
    assert tuple(scale.shape) == ((32, 1) if wd_on_out else (1, 48))
    net.merge_to(1.0)
    net.restore()
    save_file(pm._state(model), str(tmp_path / "merged.safetensors"))
    ours = da.analyze(tmp_path / "base.safetensors", tmp_path / "lycoris.safetensors",
                      axis="both")
    ref = da.analyze(tmp_path / "base.safetensors", tmp_path / "merged.safetensors", axis="both")
    ref = ref[(ref[C.DELTA_D] > 1e-9) | (ref[C.DELTA_M] > 1e-9)]
    assert set(ours[C.NAME]) == set(ref[C.NAME]) and len(ours) == len(ref) > 0
    assert set(ours[C.METHOD]) == {"dora"}
    _agree(ours, ref, rel=1e-4)


# --- torchtune DoRA, as torchtune 0.6.1 writes it (tests/data/make_torchtune_fixture.py) -------

TUNE = __import__("pathlib").Path(__file__).parents[1] / "data" / "torchtune"


@pytest.mark.parametrize("adapter", ["adapter_model.pt", "peft"])
def test_torchtune_dora_agrees_with_torchtune_merge(adapter, tmp_path):
    """torchtune keeps q/k rows in Meta's RoPE order; against a Hugging Face base its q/k
    ``lora_b`` and ``magnitude`` rows are permuted as ``tune_to_hf`` permutes the weights (its
    PEFT export permutes ``lora_B`` but not the magnitude: fixed here, head counts from the
    base's config.json). The reference is torchtune's own ``get_merged_lora_ckpt``."""
    ours = da.analyze(TUNE / "base.safetensors", TUNE / adapter, axis="both", lora_alpha=8)
    ref = da.analyze(TUNE / "base.safetensors", TUNE / "merged.safetensors", axis="both")
    ref = ref[(ref[C.DELTA_D] > 1e-9) | (ref[C.DELTA_M] > 1e-9)]
    assert set(ours[C.NAME]) == set(ref[C.NAME]) and len(ours) == len(ref) == 2 * 7 * 2
    assert set(ours[C.METHOD]) == {"dora"}
    _agree(ours, ref, rel=1e-4)


# --- every LoraConfig field: honoured, ignored or refused by name ------------------------------

def test_every_lora_config_field_has_a_rule():
    """A field PEFT adds to LoraConfig fails here until it is honoured, ignored (with the reason
    it cannot change the merged weight) or refused."""
    import dataclasses

    from dora_analysis.io.peft_config import LORA_FIELDS

    peft = pytest.importorskip("peft")
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - set(LORA_FIELDS) == set(), "LoraConfig fields without a rule"
    assert set(LORA_FIELDS) - fields == set(), "rules for fields LoraConfig no longer has"


def test_docs_table_lists_every_field_as_the_reader_treats_it():
    import re
    from pathlib import Path

    from dora_analysis.io.peft_config import LORA_FIELDS

    doc = (Path(__file__).parents[2] / "docs" / "adapters.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (honoured|ignored|refused) \|", doc, re.MULTILINE))
    assert rows == {name: rule.treatment for name, rule in LORA_FIELDS.items()}


@pytest.mark.parametrize("field, value", [
    ("use_qalora", True), ("alora_invocation_tokens", [5, 6]), ("arrow_config", {}),
    ("layer_replication", [[0, 2], [1, 2]]),
])
def test_refused_fields_are_named(ckpts, tmp_path, field, value):
    from dora_analysis.errors import UnsupportedAdapterError

    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG | {field: value}, GOOD)
    with pytest.raises(UnsupportedAdapterError, match=rf"'{field}' = .* is not supported"):
        da.analyze(ckpts["base"], folder)


@pytest.mark.parametrize("field, unset", [
    ("use_qalora", False), ("alora_invocation_tokens", None), ("arrow_config", None),
    ("layer_replication", []), ("layer_replication", None),
])
def test_refused_fields_at_their_default_are_read(ckpts, tmp_path, field, unset):
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG | {field: unset}, GOOD)
    assert len(da.analyze(ckpts["base"], folder)) == 1


@pytest.mark.parametrize("config", [
    {"layer_replication": [[0, 2], [1, 2]]},
    {"alora_invocation_tokens": [5], "task_type": "CAUSAL_LM"},
])
def test_refused_fields_on_adapters_peft_wrote(tmp_path, config):
    import warnings

    from dora_analysis.errors import UnsupportedAdapterError

    pm = pytest.importorskip("tests.peft_models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = pm.make_case(tmp_path, "refused", pm.tiny_llama,
                            {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config},
                            merge=False)
    field = next(k for k in config if k != "task_type")
    with pytest.raises(UnsupportedAdapterError, match=f"'{field}'"):
        da.analyze(case.base, case.adapter)


@pytest.mark.parametrize("field", ["use_rslora", "fan_in_fan_out", "use_dora",
                                   "ensure_weight_tying", "use_qalora"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1])
def test_booleans_must_be_json_booleans(ckpts, tmp_path, field, value):
    """PEFT reads any non-empty string as true ("false" included): refused, never guessed."""
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG | {field: value}, GOOD)
    with pytest.raises(CheckpointFormatError, match=rf"'{field}' must be true or false, got "):
        da.analyze(ckpts["base"], folder)


def test_string_false_no_longer_changes_the_numbers(ckpts, tmp_path, capsys):
    """The reported defect: "use_rslora": "false" gave α/√r, "fan_in_fan_out": "false" a
    transposed B·A. Now one error line, and JSON false reads as plain LoRA."""
    from dora_analysis.cli import main

    base = tmp_path / "square.safetensors"  # (24, 24): a transposed B·A fits it as well
    save_file({Q + ".weight": rand(24, 24, seed=9)}, str(base))
    for field in ("use_rslora", "fan_in_fan_out"):
        folder = write_peft_like(tmp_path / field, PEFT_CONFIG | {field: "false"}, SQUARE)
        assert main([str(base), str(folder), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and f"'{field}'" in err
    plain = da.analyze(base, write_peft_like(tmp_path / "p", PEFT_CONFIG, SQUARE))
    false = da.analyze(base, write_peft_like(
        tmp_path / "f", PEFT_CONFIG | {"use_rslora": False, "fan_in_fan_out": False}, SQUARE))
    assert false[C.DELTA_D].tolist() == plain[C.DELTA_D].tolist()


@pytest.mark.parametrize("config, message", [
    ({"lora_alpha": 10**400}, "'lora_alpha' must be a finite positive number, got 1000"),
    ({"lora_alpha": float("inf")}, "'lora_alpha' must be a finite positive number"),
    ({"lora_alpha": "8"}, "'lora_alpha' must be a finite positive number, got '8'"),
    ({"r": 10**9}, "rank 4 in its weights but r = 1000000000 by 'r' in adapter_config.json"),
    ({"r": 4.0}, "'r' must be a positive integer"),
    ({"rank_pattern": {"q_proj": 2}}, "rank 4 in its weights but r = 2 by rank_pattern"),
    ({"alpha_pattern": {"q_proj": 10**400}}, "'alpha_pattern' gives 'q_proj' the value"),
    ({"init_lora_weights": "xavier"}, "'init_lora_weights' must be true, false or one of"),
    ({"use_bdlora": {"nblocks": 0}}, "'use_bdlora' must be null or an object"),
    ({"trainable_token_indices": ["a"]}, "'trainable_token_indices' must be a list of token"),
])
def test_config_numbers_and_types_give_one_error_line(ckpts, tmp_path, capsys, config, message):
    from dora_analysis.cli import main

    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG | config, GOOD)
    assert main([str(ckpts["base"]), str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_unknown_fields_are_refused_unless_empty(ckpts, tmp_path):
    from dora_analysis.errors import UnsupportedAdapterError

    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG | {"use_newlora": True}, GOOD)
    with pytest.raises(UnsupportedAdapterError, match="field 'use_newlora' = True is not one of"):
        da.analyze(ckpts["base"], folder)
    for i, empty in enumerate((None, False, [], {})):
        folder = write_peft_like(tmp_path / f"e{i}", PEFT_CONFIG | {"use_newlora": empty}, GOOD)
        assert len(da.analyze(ckpts["base"], folder)) == 1


def test_unknown_adapter_tensors_are_refused(ckpts, tmp_path):
    from dora_analysis.errors import UnsupportedAdapterError

    odd = GOOD | {f"base_model.model.{Q}.lora_gate.weight": rand(4, 4, seed=5)}
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG, odd)
    with pytest.raises(UnsupportedAdapterError, match=r"lora_gate\.weight"):
        da.analyze(ckpts["base"], folder)


def test_kasa_diagonal_needs_its_config(ckpts, tmp_path):
    """A lora_diag without kasa_config (or the reverse) is not guessed."""
    diag = {f"base_model.model.{Q}.lora_diag": rand(4, seed=3)}
    folder = write_peft_like(tmp_path / "a", PEFT_CONFIG, GOOD | diag)
    with pytest.raises(CheckpointFormatError, match="lora_diag but no kasa_config"):
        da.analyze(ckpts["base"], folder)
    folder = write_peft_like(tmp_path / "b", PEFT_CONFIG | {"kasa_config": {}}, GOOD)
    with pytest.raises(CheckpointFormatError, match="kasa_config but no lora_diag"):
        da.analyze(ckpts["base"], folder)


def test_every_other_peft_type_is_refused_by_name(ckpts, tmp_path):
    from dora_analysis.errors import UnsupportedAdapterError

    peft = pytest.importorskip("peft")
    for i, peft_type in enumerate(t.value for t in peft.PeftType if t.value != "LORA"):
        folder = write_peft_like(tmp_path / f"t{i}", PEFT_CONFIG | {"peft_type": peft_type}, GOOD)
        with pytest.raises(UnsupportedAdapterError, match=f"adapter type {peft_type} is not"):
            da.analyze(ckpts["base"], folder)


@pytest.mark.parametrize("make", ["IA3Config", "LoHaConfig", "LoKrConfig", "AdaLoraConfig",
                                  "VeraConfig", "OFTConfig"])
def test_other_tuners_peft_wrote_are_refused_by_name(tmp_path, make):
    import warnings

    from dora_analysis.errors import UnsupportedAdapterError

    peft = pytest.importorskip("peft")
    pm = pytest.importorskip("tests.peft_models")
    model = pm.tiny_llama()
    save_file(pm._state(model), str(tmp_path / "base.safetensors"))
    kwargs = {"target_modules": ["q_proj", "v_proj"]}
    if make == "AdaLoraConfig":
        kwargs["total_step"] = 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(model, getattr(peft, make)(**kwargs)).save_pretrained(
            str(tmp_path / "adapter"))
    peft_type = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"]
    with pytest.raises(UnsupportedAdapterError, match=f"adapter type {peft_type} is not"):
        da.analyze(tmp_path / "base.safetensors", tmp_path / "adapter")


def test_dora_without_magnitudes_is_warned_once_per_run(ckpts, tmp_path, capsys):
    """Planning and running both open the adapter; the warning comes once (it came twice)."""
    from dora_analysis.cli import main

    prefix = "base_model.model."
    folder = write_peft_like(
        tmp_path / "bridge", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True},
        {prefix + Q + ".lora_A.weight": rand(4, 16, seed=1),
         prefix + Q + ".lora_B.weight": rand(24, 4, seed=2)})
    assert main([str(ckpts["base"]), str(folder), "--quiet"]) == 0
    assert capsys.readouterr().err.count("says use_dora") == 1
