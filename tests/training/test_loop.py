"""Training loop and checkpoints: series layout, PEFT loads our adapters, resume, atomic saves."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import dora_analysis as da
from dora_analysis.training import loop
from dora_analysis.training.config import TrainConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def batch_at(i: int) -> dict:
    g = torch.Generator().manual_seed(1000 + i)
    ids = torch.randint(0, 100, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": (ids[:, 0] > 50).long()}


def config(tmp_path, method, **kw):
    return TrainConfig(method=method, targets=("query", "value", "intermediate.dense"), rank=4,
                       alpha=8, lr=1e-2, steps=6, batch_size=4, save_steps=(2, 4),
                       modules_to_save=("classifier",), output=tmp_path / method, **kw)


@pytest.mark.parametrize("method", ["ft", "lora", "dora"])
def test_series_layout_and_analysis(tmp_path, method):
    model = tiny_bert()
    torch.save(model.state_dict(), tmp_path / "base.bin")
    cfg = config(tmp_path, method)
    result = loop.train(loop.prepare(model, cfg), batch_at, cfg)
    assert [p.name for p in result.checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    weights = "model.safetensors" if method == "ft" else "adapter_model.safetensors"
    for ck in result.checkpoints:
        assert (ck / weights).is_file() and (ck / "trainer_state.json").is_file()
    assert not list(cfg.output.glob(".*.tmp"))
    table = da.analyze(tmp_path / "base.bin", cfg.output, modules=("q", "v", "up"))
    assert sorted(set(table["step"])) == [2, 4, 6]
    assert set(table["method"]) == ({"unknown"} if method == "ft" else {method})
    assert (table["delta_d"] > 0).all()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_loads_our_adapter_with_no_missing_keys_and_same_outputs(tmp_path, method):
    base = tiny_bert()
    ours = loop.prepare(copy.deepcopy(base), config(tmp_path, method))
    cfg = config(tmp_path, method)
    loop.train(ours, batch_at, cfg)
    ours.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), cfg.output / "checkpoint-6")
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings
    theirs.eval()
    batch = batch_at(99)
    batch.pop("labels")
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("method", ["ft", "dora"])
def test_resume_continues_the_same_run(tmp_path, method):
    """Resuming from checkpoint-2 of a run ends with the weights of the uninterrupted run."""
    cfg = config(tmp_path, method, dropout=0.1 if method == "dora" else 0.0)
    straight = loop.prepare(tiny_bert(), cfg)
    full = loop.train(straight, batch_at, cfg)
    resumed_cfg = config(tmp_path / "again", method, dropout=cfg.dropout)
    resumed = loop.prepare(tiny_bert(), resumed_cfg)  # same pretrained base
    with torch.no_grad():  # scramble what training touches: it must all come from the ckpt
        for param in resumed.parameters():
            if param.requires_grad:
                param.normal_()
    out = loop.train(resumed, batch_at, resumed_cfg, resume=cfg.output / "checkpoint-2")
    assert out.losses == pytest.approx(full.losses, rel=1e-5)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(),
                                 strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_evaluation_is_saved_per_checkpoint_and_does_not_change_training(tmp_path):
    """Scored in eval mode without gradients before each save; the run's weights and losses are
    those of a run without evaluation (dropout on, so a changed RNG stream would show)."""
    cfg = config(tmp_path / "plain", "dora", dropout=0.1)
    plain_model = loop.prepare(tiny_bert(), cfg)
    plain = loop.train(plain_model, batch_at, cfg)
    seen = []

    def evaluate(model):
        seen.append((model.training, torch.is_grad_enabled()))
        ids = batch_at(99)
        logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        return {"accuracy": float((logits.argmax(-1) == ids["labels"]).float().mean())}

    cfg_eval = config(tmp_path / "eval", "dora", dropout=0.1)
    model = loop.prepare(tiny_bert(), cfg_eval)
    scored = loop.train(model, batch_at, cfg_eval, evaluate=evaluate)
    assert seen == [(False, False)] * 3 and model.training
    assert [e["step"] for e in scored.evals] == [2, 4, 6]
    for ck, metrics in zip(scored.checkpoints, scored.evals, strict=True):
        assert json.loads((ck / "eval_results.json").read_text()) == metrics
    assert not (plain.checkpoints[0] / "eval_results.json").exists()
    assert scored.losses == plain.losses
    for (name, a), (_, b) in zip(plain_model.named_parameters(), model.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    cfg = config(tmp_path, "lora")
    model = loop.prepare(tiny_bert(), cfg)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loop, "save_file", broken)
    with pytest.raises(OSError):
        loop.train(model, batch_at, cfg)
    assert list(cfg.output.iterdir()) == []


def test_only_adapters_and_saved_modules_train():
    model = loop.prepare(tiny_bert(), TrainConfig(method="dora", targets=("query",), steps=2,
                                                  modules_to_save=("classifier",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("classifier.") for n in trainable)
    with pytest.raises(ValueError, match="--targets nope matches no adaptable module"):
        loop.prepare(tiny_bert(), TrainConfig(method="lora", targets=("nope",), steps=2))


def test_schedule_warms_up_then_decays():
    f = loop.linear_schedule(2, 10)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.333, 0.667, 1.0, 0.5, 0.0]


def test_weight_decay_spares_biases_and_norms_but_not_dora_magnitudes(tmp_path):
    model = loop.prepare(tiny_bert(), config(tmp_path, "dora"))
    decay, no_decay = loop.parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert any(n.endswith("lora_magnitude_vector") or "magnitude" in n for n in decayed)
    assert any("lora_A" in n or "lora_a" in n.lower() for n in decayed)
    assert "classifier.weight" in decayed and "classifier.bias" in spared
    assert not any("LayerNorm" in n for n in decayed)
    assert all(n.endswith("bias") or "LayerNorm" in n for n in spared)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | spared == trainable


def tiny_llama_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


def lm_batch_at(i: int) -> dict:
    g = torch.Generator().manual_seed(2000 + i)
    ids = torch.randint(5, 2000, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_gradient_checkpointing_changes_memory_not_gradients(tiny_llama):
    """Recomputed activations give the same loss and gradients (no dropout: deterministic)."""
    grads = {}
    for checkpointing in (False, True):
        cfg = TrainConfig(method="dora", rank=4, alpha=8, steps=1,
                          gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # the same A initialisation
        model = loop.prepare(tiny_llama_model(tiny_llama), cfg)
        with torch.no_grad():  # B away from zero, so every factor gets a gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
        model.train()
        checkpointed = [m.gradient_checkpointing for m in model.modules()
                        if hasattr(m, "gradient_checkpointing")]
        assert checkpointed and all(c == checkpointing for c in checkpointed)
        loss = loop.hf_loss(model, lm_batch_at(0))
        loss.backward()
        grads[checkpointing] = (loss.item(), {n: p.grad for n, p in model.named_parameters()
                                              if p.requires_grad})
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    assert sorted(grads[True][1]) == sorted(grads[False][1])
    for name, grad in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_trains_in_bf16_and_keeps_float32_weights(tmp_path, tiny_llama):
    cfg = TrainConfig(method="lora", rank=4, alpha=8, lr=1e-2, steps=1, batch_size=2,
                      dtype="bfloat16")
    model = loop.prepare(tiny_llama_model(tiny_llama), cfg)
    seen = []
    model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loop.train(model, lm_batch_at, cfg)
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert cfg.targets == ("q_proj", "v_proj")  # auto resolved, as recorded in adapter_config


def test_resuming_a_checkpoint_of_another_method_is_refused(tmp_path):
    cfg = config(tmp_path, "ft")
    loop.train(loop.prepare(tiny_bert(), cfg), batch_at, cfg)
    other = config(tmp_path / "other", "lora")
    with pytest.raises(da.DoraAnalysisError, match=r"checkpoint-2: saved with --method ft "
                                                   r"\(here lora\); continue it with the "
                                                   r"settings it was saved with"):
        loop.train(loop.prepare(tiny_bert(), other), batch_at, other,
                   resume=cfg.output / "checkpoint-2")
