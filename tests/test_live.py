"""analyze_model: an in-memory model gives the rows analyze() gives for the same weights saved —
full fine-tuning, this project's LoRA/DoRA layers, PEFT-wrapped (linear, GPT-2 Conv1D,
embeddings, a classifier trained in full)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import dora_analysis as da
from dora_analysis.errors import ConfigError, TensorMismatchError, UnmatchedTensorsWarning
from dora_analysis.training.config import TrainConfig
from dora_analysis.training.loop import prepare, save_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
#: Columns that name where the rows came from rather than what they measure.
PROVENANCE = ["checkpoint", "ref", "base", "step"]  # where the rows came from


def same_rows(live, saved) -> None:
    assert len(live) == len(saved) > 0
    a = live.drop(columns=PROVENANCE).sort_values(["name", "axis"]).reset_index(drop=True)
    b = saved.drop(columns=PROVENANCE).sort_values(["name", "axis"]).reset_index(drop=True)
    numeric = [c for c in a.columns if a[c].dtype.kind == "f"]
    assert a.drop(columns=numeric).equals(b.drop(columns=numeric))
    for c in numeric:
        expected = pytest.approx(b[c].to_numpy(), rel=1e-6, abs=1e-12, nan_ok=True)
        assert a[c].to_numpy() == expected, c


def llama(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


def scramble(model, std=0.05):
    """What training does to the trainable weights (B and m move away from their start)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g) * (1 if "lora_" in name else 0.1))


def save_ours(model, cfg, tmp_path, step=5):
    cfg.output = tmp_path / "run"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(model, cfg, step, opt, sched, [])


@pytest.mark.parametrize("method", ["ft", "lora", "dora"])
def test_our_training_layers_and_full_weights(tmp_path, tiny_llama, method):
    cfg = TrainConfig(method=method, targets=("q_proj", "v_proj", "embed_tokens"), rank=3,
                      alpha=6)
    model = prepare(llama(tiny_llama), cfg)
    scramble(model)
    ckpt = save_ours(model, cfg, tmp_path)
    live = da.analyze_model(model, tiny_llama, modules=("q", "v", "embed_tokens"))
    saved = da.analyze(tiny_llama, ckpt, modules=("q", "v", "embed_tokens"))
    same_rows(live, saved)
    assert set(live["method"]) == {"unknown" if method == "ft" else method}
    assert (live["delta_d"] > 0).all()


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_wrapped_llama_with_an_embedding_adapter(tmp_path, tiny_llama, use_dora):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, use_rslora=use_dora,
                             target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = peft.get_peft_model(llama(tiny_llama), config)
    scramble(model)
    model.save_pretrained(tmp_path / "adapter")
    live = da.analyze_model(model, tiny_llama, axis="both")
    saved = da.analyze(tiny_llama, tmp_path / "adapter", axis="both")
    same_rows(live, saved)
    assert set(live["module"]) == {"q", "v", "embed_tokens"}


def test_peft_gpt2_conv1d_dora(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=2, n_positions=16)
    base = transformers.GPT2LMHeadModel(cfg)
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    scramble(model)
    model.save_pretrained(tmp_path / "adapter")
    live = da.analyze_model(model, base)  # the base as a module
    same_rows(live, da.analyze(tmp_path / "base", tmp_path / "adapter"))
    same_rows(da.analyze_model(model, base.state_dict()), live)  # or a state dict


def test_a_classifier_trained_in_full_next_to_the_adapters(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=40, num_labels=3)
    base = transformers.BertForSequenceClassification(cfg)
    base.save_pretrained(tmp_path / "base")
    train_cfg = TrainConfig(method="dora", targets=("query", "value"), rank=2, alpha=4,
                            modules_to_save=("classifier",))
    model = prepare(copy.deepcopy(base), train_cfg)
    scramble(model)
    live = da.analyze_model(model, tmp_path / "base")
    same_rows(live, da.analyze(tmp_path / "base", save_ours(model, train_cfg, tmp_path)))
    assert "classifier.weight" in set(live["name"])
    wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"]))
    scramble(wrapped)
    wrapped.save_pretrained(tmp_path / "peft")
    same_rows(da.analyze_model(wrapped, tmp_path / "base"),
              da.analyze(tmp_path / "base", tmp_path / "peft"))


def test_merged_or_several_active_adapters_and_a_wrong_base_are_refused(tmp_path, tiny_llama):
    model = prepare(llama(tiny_llama), TrainConfig(method="lora", targets=("q_proj",)))
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ConfigError, match=r"layers.0.self_attn.q_proj: the adapter is merged"):
        da.analyze_model(model, tiny_llama)
    wrapped = peft.get_peft_model(llama(tiny_llama), peft.LoraConfig(target_modules=["q_proj"]))
    wrapped.add_adapter("other", peft.LoraConfig(target_modules=["q_proj"]))
    wrapped.base_model.set_adapter(["default", "other"])
    with pytest.raises(ConfigError, match=r"2 active adapters \(default, other\)"):
        da.analyze_model(wrapped, tiny_llama)
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=20, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1))
    ours = prepare(llama(tiny_llama), TrainConfig(method="dora", targets=("q_proj",)))
    with pytest.raises(TensorMismatchError, match="adapter does not fit the base"):
        da.analyze_model(ours, other)


def test_a_sharded_model_is_refused_with_advice(tmp_path):
    # FSDP2 leaves each rank a DTensor shard: its row norms are not the matrix's, so no table
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
        base = copy.deepcopy(model.state_dict())
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ConfigError, match=r"model: 0\.weight is a DTensor shard .*analyse "
                                              r"the checkpoint the run saves"):
            da.analyze_model(model, base)
        with pytest.raises(ConfigError, match="base: 0.weight is a DTensor shard"):
            da.analyze_model(torch.nn.Sequential(torch.nn.Linear(6, 4)), model)
    finally:
        dist.destroy_process_group()


# -- issue 21, item 15: the base module that PEFT wrapped in place ---------------------------------
def exactly_the_saved_rows(live, saved) -> None:
    """Names, rows and every column equal; floats to 1e-12 (both read the same float32 weights)."""
    key = ["name", "axis"]
    a = live.drop(columns=PROVENANCE).sort_values(key).reset_index(drop=True)
    b = saved.drop(columns=PROVENANCE).sort_values(key).reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and a["name"].tolist() == b["name"].tolist()
    numeric = [c for c in a.columns if a[c].dtype.kind == "f"]
    assert a.drop(columns=numeric).equals(b.drop(columns=numeric))
    for c in numeric:
        assert a[c].to_numpy() == pytest.approx(b[c].to_numpy(), rel=1e-12, abs=1e-15,
                                                 nan_ok=True), c


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("given", ["in-place", "copy", "get_base_model", "peft_model"])
def test_the_base_module_peft_wrapped_in_place_gives_the_saved_table(tmp_path, use_dora, given):
    # The notebook flow: base = AutoModel...; peft_model = get_peft_model(base, cfg). PEFT injects
    # into `base` itself: its q_proj becomes a LoRA layer (W0 in base_layer), its lm_head a
    # ModulesToSaveWrapper (the original beside the trained copy).
    from tests.peft_models import LLAMA_TARGETS, _randomise, tiny_llama

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    copy_of_base = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=use_dora, target_modules=LLAMA_TARGETS,
        modules_to_save=["lm_head"]))
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in base.state_dict()
    _randomise(model, seed=3)
    model.save_pretrained(tmp_path / "adapter")
    module = {"in-place": base, "copy": copy_of_base, "get_base_model": model.get_base_model(),
              "peft_model": model}
    saved = da.analyze(tmp_path / "base", tmp_path / "adapter", axis="both", spectrum=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedTensorsWarning)  # once: lm_head "only in model"
        live = da.analyze_model(model, module[given], axis="both", spectrum=True)
    exactly_the_saved_rows(live, saved)
    assert "lm_head.weight" in set(live["name"])
    assert set(live["module"]) == {"q", "v", "down", "lm_head"}
    assert (live[live["module"] == "lm_head"]["delta_d"] > 0).all()  # the trained copy, vs W0


def test_a_base_that_no_longer_holds_w0_is_refused(tmp_path):
    from tests.peft_models import tiny_llama

    base = tiny_llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    scramble(model)
    with pytest.raises(ConfigError, match=r"base: the state dict holds adapter layers \(model\."
                                          r"layers\.0\.self_attn\.q_proj\.base_layer\.weight\)"):
        da.analyze_model(model, base.state_dict())
    merged = copy.deepcopy(model)
    merged.base_model.model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attn\.q_proj: an adapter is merged"):
        da.analyze_model(model, merged.get_base_model())
    # this project's layers train modules_to_save in place, keeping no original: the base
    # module they were injected into no longer holds lm_head's W0 (its change read as zero)
    ours = tiny_llama()
    prepare(ours, TrainConfig(method="dora", targets=("q_proj",), modules_to_save=("lm_head",)))
    with pytest.raises(ConfigError, match=r"^base: lm_head\.weight is trained by the model in "
                                          r"place .*copy\.deepcopy"):
        da.analyze_model(ours, ours)
    full = tiny_llama()  # full fine-tuning in place: every weight
    with pytest.raises(ConfigError, match=r"^base: \d+ tensors \(model\.embed_tokens\.weight, "
                                          r".*\) are trained by the model in place"):
        da.analyze_model(full, full.state_dict())


def test_analyze_model_checks_modules_and_its_own_arguments(tiny_llama):
    model = peft.get_peft_model(llama(tiny_llama), peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"]))
    scramble(model)
    assert set(da.analyze_model(model, tiny_llama, modules="q_proj")["module"]) == {"q"}
    with pytest.raises(ConfigError, match=r"^--modules value: no module of the base has that "
                                          r"kind or name; module kinds present: down, "):
        da.analyze_model(model, tiny_llama, modules="q,value")
    with pytest.warns(UnmatchedTensorsWarning, match=r"^--modules k: no rows; .*kinds analysed: "
                                                     r"q$"):
        da.analyze_model(model, tiny_llama, modules="q,k")  # the adapter has no k
    for bad, match in (({"label": ["a"]}, "label must be a non-empty string"),
                       ({"step": -1}, "step must be a whole number"),
                       ({"step": "5"}, "step must be a whole number"),
                       ({"intruders": True, "intruder_k": 0}, "--intruder-k must be a positive")):
        with pytest.raises(ConfigError, match=match):
            da.analyze_model(model, tiny_llama, **bad)
