"""Gradient accumulation weighs every target token (seq-cls: every example) alike: the gradient of
k micro-batches of B/k equals that of one batch of B on the same examples, to float32 precision,
also when the micro-batches hold different numbers of target tokens."""

from __future__ import annotations

import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dora_analysis.errors import TrainingDataError
from dora_analysis.training.accumulation import label_units
from dora_analysis.training.config import TrainConfig
from dora_analysis.training.data import causal_batches, classification_batches, encode_causal
from dora_analysis.training.loop import prepare, train

transformers = pytest.importorskip("transformers")


def step_gradients(model, batch_at, config) -> torch.Tensor:
    """The gradient the optimizer sees at the first step of ``train``, flattened."""
    seen = []

    def grab(optimizer, args, kwargs):
        seen.append(torch.cat([p.grad.flatten() for group in optimizer.param_groups
                               for p in group["params"]]).clone())

    handle = register_optimizer_step_pre_hook(grab)
    try:
        train(model, batch_at, config)
    finally:
        handle.remove()
    return seen[0]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def with_random_b(model):
    """B away from zero, so that every adapter factor has a gradient."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def qa_examples(tmp_path, tokenizer, n=8):
    """Responses of 1 to 99 words: micro-batches differ in target tokens and in padding."""
    rows = [{"prompt": f"question {i}", "response": " ".join(["word"] * (1 + 2 * i * i))}
            for i in range(n)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return encode_causal(path, tokenizer, 128)


@pytest.mark.parametrize("micro, accum", [(4, 2), (2, 4), (1, 8)])
def test_causal_lm_accumulation_equals_the_big_batch(tmp_path, tiny_llama, micro, accum):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    examples = qa_examples(tmp_path, tokenizer)
    grads = {}
    for batch_size, k in ((8, 1), (micro, accum)):
        config = TrainConfig(method="dora", rank=4, alpha=8, steps=1, lr=1e-6,
                             batch_size=batch_size, grad_accum=k, max_grad_norm=None)
        torch.manual_seed(0)  # the same adapters
        model = with_random_b(prepare(
            transformers.AutoModelForCausalLM.from_pretrained(tiny_llama), config))
        batch_at = causal_batches(examples, tokenizer.pad_token_id, batch_size, seed=0)
        grads[k] = step_gradients(model, batch_at, config)
    # the micro-batches of the step hold different numbers of target tokens
    small = causal_batches(examples, tokenizer.pad_token_id, micro, seed=0)
    counts = {int((small(i)["labels"][:, 1:] != -100).sum()) for i in range(accum)}
    assert len(counts) > 1
    assert grads[1].norm() > 0
    assert relative_l2(grads[accum], grads[1]) <= 1e-6


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def test_sequence_classification_accumulation_equals_the_big_batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (8,), generator=g)
    ids = torch.randint(1, 100, (8, 12), generator=g)
    mask = (torch.arange(12) < lengths[:, None]).long()  # (8, 12): padding of different lengths
    encodings = {"input_ids": ids * mask, "attention_mask": mask}
    labels = torch.randint(0, 3, (8,), generator=g)
    grads = {}
    for batch_size, k in ((8, 1), (2, 4)):
        config = TrainConfig(method="lora", targets=("query", "value"), rank=4, alpha=8,
                             steps=1, lr=1e-6, batch_size=batch_size, grad_accum=k,
                             max_grad_norm=None, modules_to_save=("classifier",))
        model = with_random_b(prepare(tiny_bert(), config))
        grads[k] = step_gradients(model, classification_batches(encodings, labels, batch_size,
                                                                0), config)
    assert grads[1].norm() > 0
    assert relative_l2(grads[4], grads[1]) <= 1e-6


def test_units_are_counted_as_the_loss_counts_them(tiny_llama):
    causal = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    labels = torch.tensor([[-100, 5, 6, -100], [7, 8, -100, -100]])
    # the model predicts token t + 1 at position t: position 0's label is never a target
    assert label_units(causal)({"labels": labels}) == 3
    assert label_units(tiny_bert())({"labels": torch.tensor([0, 2, 1])}) == 3
    assert label_units(torch.nn.Linear(2, 2))({"x": torch.zeros(5, 2)}) == 5


def test_a_micro_batch_without_targets_is_an_error_not_nan(tiny_llama):
    config = TrainConfig(method="lora", rank=2, steps=1, batch_size=2)
    model = prepare(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama), config)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([[7, -100, -100], [-100, -100, -100]])}
    with pytest.raises(TrainingDataError, match="micro-batch 0 of step 1 has no target"):
        train(model, lambda i: batch, config)
