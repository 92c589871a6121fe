"""Name alignment and layer/module parsing."""

from __future__ import annotations

import pytest

from dora_analysis.io.keys import (
    align_names,
    is_conv1d,
    layer_index,
    module_kind,
    stored_in_out,
    strip_wrappers,
)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.0.self_attn.q_proj.weight", "q"),
        ("model.layers.0.self_attn.k_proj.weight", "k"),
        ("model.layers.0.self_attn.v_proj.weight", "v"),
        ("model.layers.0.self_attn.o_proj.weight", "o"),
        ("model.layers.0.mlp.gate_proj.weight", "gate"),
        ("model.layers.0.mlp.up_proj.weight", "up"),
        ("model.layers.0.mlp.down_proj.weight", "down"),
        ("layers.3.attention.wq.weight", "q"),
        ("layers.3.attention.wo.weight", "o"),
        ("layers.3.feed_forward.w1.weight", "gate"),
        ("layers.3.feed_forward.w2.weight", "down"),
        ("layers.3.feed_forward.w3.weight", "up"),
        ("encoder.layer.0.attention.self.query.weight", "q"),
        ("encoder.layer.0.attention.self.key.weight", "k"),
        ("encoder.layer.0.attention.self.value.weight", "v"),
        ("encoder.layer.0.attention.output.dense.weight", "o"),
        ("encoder.layer.0.intermediate.dense.weight", "up"),
        ("encoder.layer.0.output.dense.weight", "down"),
        ("transformer.h.2.attn.c_attn.weight", "qkv"),
        ("transformer.h.2.attn.c_proj.weight", "o"),
        ("transformer.h.2.mlp.c_fc.weight", "up"),
        ("transformer.h.2.mlp.c_proj.weight", "down"),
        ("encoder.block.0.layer.0.SelfAttention.q.weight", "q"),
        ("encoder.block.0.layer.0.SelfAttention.o.weight", "o"),
        ("model.decoder.layers.1.fc1.weight", "up"),
        ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "q"),
        ("lm_head.weight", "lm_head"),
        ("model.embed_tokens.weight", "embed_tokens"),
        ("pooler.dense.weight", "dense"),
    ],
)
def test_module_kind(name, kind):
    assert module_kind(name) == kind


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("model.layers.12.self_attn.q_proj.weight", 12),
        ("encoder.layer.0.attention.self.query.weight", 0),
        ("transformer.h.5.attn.c_attn.weight", 5),
        ("lm_head.weight", None),
    ],
)
def test_layer_index(name, layer):
    assert layer_index(name) == layer


def test_conv1d_detection():
    assert is_conv1d("transformer.h.0.attn.c_attn.weight")
    assert is_conv1d("h.0.mlp.c_proj.weight")
    assert not is_conv1d("model.layers.0.self_attn.q_proj.weight")


@pytest.mark.parametrize(("name", "in_out"), [
    ("transformer.h.0.attn.c_attn.weight", True),
    ("model.embed_tokens.weight", True),
    ("embeddings.word_embeddings.weight", True),
    ("transformer.wte.weight", True),
    ("lm_head.weight", False),
    ("model.layers.0.self_attn.q_proj.weight", False),
])
def test_stored_in_out(name, in_out):
    assert stored_in_out(name) is in_out


def test_strip_wrappers():
    assert strip_wrappers("base_model.model.model.layers.0.q.weight") == "layers.0.q.weight"
    assert strip_wrappers("module._orig_mod.layers.0.q.weight") == "layers.0.q.weight"


def test_align_exact_and_wrapper_prefixes():
    base = ["model.layers.0.q_proj.weight", "lm_head.weight"]
    tuned = ["base_model.model.model.layers.0.q_proj.weight", "lm_head.weight"]
    a = align_names(base, tuned)
    assert sorted(a.pairs) == sorted([
        ("lm_head.weight", "lm_head.weight"),
        ("model.layers.0.q_proj.weight", "base_model.model.model.layers.0.q_proj.weight"),
    ])
    assert a.base_only == [] and a.tuned_only == []


def test_align_missing_model_prefix_either_side():
    a = align_names(["layers.0.q.weight"], ["model.layers.0.q.weight"])
    assert a.pairs == [("layers.0.q.weight", "model.layers.0.q.weight")]
    b = align_names(["model.layers.0.q.weight"], ["layers.0.q.weight"])
    assert b.pairs == [("model.layers.0.q.weight", "layers.0.q.weight")]


def test_align_extra_head_component():
    base = ["encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"]
    tuned = ["bert.encoder.layer.0.attention.self.query.weight",
             "bert.embeddings.word_embeddings.weight", "classifier.weight"]
    a = align_names(base, tuned)
    assert len(a.pairs) == 2 and a.tuned_only == ["classifier.weight"] and a.base_only == []


def test_align_reports_leftovers_on_both_sides():
    a = align_names(["a.weight", "b.weight"], ["a.weight", "c.weight"])
    assert a.pairs == [("a.weight", "a.weight")]
    assert a.base_only == ["b.weight"] and a.tuned_only == ["c.weight"]
