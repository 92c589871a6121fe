"""What ``dora-train`` can train: one class per task, chosen by ``--task`` from :data:`TASKS`.

A task names the ``transformers`` auto class and PEFT task type, reads and checks its data
files when it is made (before any model is loaded), fits the tokenizer and the model to its
batches, and turns the data into ``batch_at(i)`` and an optional held-out evaluation. Adding a
task is one class and one registry entry.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError, TrainingDataError
from .data import IGNORE, causal_batches, classification_batches, collate, encode_records, pad_id
from .records import read_causal, read_classification
from .runtime import model_device


class SequenceClassification:
    """A new classification head on a pretrained encoder; data ``text``/``label`` rows."""

    name = "seq-cls"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    #: New heads train in full next to the adapters (as PEFT does).
    modules_to_save = ("classifier", "score")

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.texts, labels = read_classification(args.data, args.text_field, args.label_field)
        self.names = sorted(set(labels))
        self.label_ids = torch.tensor([self.names.index(label) for label in labels])
        self.heldout = None
        if args.eval_data is not None:
            self.heldout = read_classification(args.eval_data, args.text_field,
                                               args.label_field, min_labels=1)
            unknown = sorted(set(self.heldout[1]) - set(self.names))
            if unknown:
                raise TrainingDataError(f"{args.eval_data}: label(s) not in the training data: "
                                        f"{', '.join(unknown[:5])}")

    def model_kwargs(self) -> dict:
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)),
                "label2id": {n: i for i, n in enumerate(self.names)}}

    def extra(self) -> dict:
        return {"labels": self.names}

    def write_run_files(self, output: Path) -> None:
        (output / "labels.json").write_text(json.dumps(self.names))

    def fit_tokenizer(self, tokenizer) -> None:
        """Batches are padded: a tokenizer without a pad token pads with end-of-sequence (as
        is usual for decoders)."""
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"{self.args.model}: the tokenizer has neither a padding nor "
                                  "an end-of-sequence token to pad batches with; add a "
                                  "pad_token to its tokenizer_config.json")
            tokenizer.pad_token = tokenizer.eos_token

    def fit_model(self, model, tokenizer) -> None:
        """A decoder classifies at its last token that is not padding, found by the config's
        ``pad_token_id``: without one, the tokenizer's (transformers would refuse batches)."""
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    def _encode(self, tokenizer, texts: list[str]) -> dict:
        return dict(tokenizer(texts, truncation=True, max_length=self.args.max_length,
                              padding="max_length", return_tensors="pt"))

    def batches(self, tokenizer, batch_size: int, seed: int):
        """``(batch_at, evaluate or None)``."""
        batch_at = classification_batches(self._encode(tokenizer, self.texts), self.label_ids,
                                          batch_size, seed)
        evaluate = None
        if self.heldout is not None:
            texts, labels = self.heldout
            evaluate = accuracy_eval(self._encode(tokenizer, texts),
                                     torch.tensor([self.names.index(x) for x in labels]))
        return batch_at, evaluate


class CausalLanguageModelling:
    """Next-token prediction on a decoder; data ``prompt``/``response``, ``messages`` or
    ``text`` JSONL lines (see :mod:`.data`)."""

    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    modules_to_save = ()

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = read_causal(args.data)
        self.heldout = None if args.eval_data is None else read_causal(args.eval_data)

    def model_kwargs(self) -> dict:
        return {}

    def extra(self) -> dict:
        return {}

    def write_run_files(self, output: Path) -> None:
        pass

    def fit_tokenizer(self, tokenizer) -> None:
        pass  # padding falls back to end-of-sequence (see data.pad_id): never attended

    def fit_model(self, model, tokenizer) -> None:
        pass

    def batches(self, tokenizer, batch_size: int, seed: int):
        """``(batch_at, evaluate or None)``; examples tokenized once, batches padded each."""
        pad = pad_id(tokenizer)
        examples = encode_records(self.args.data, *self.data, tokenizer, self.args.max_length)
        evaluate = None
        if self.heldout is not None:
            heldout = encode_records(self.args.eval_data, *self.heldout, tokenizer,
                                     self.args.max_length)
            evaluate = token_loss_eval([collate(heldout[i : i + 16], pad)
                                        for i in range(0, len(heldout), 16)])
        return causal_batches(examples, pad, batch_size, seed), evaluate


TASKS = {task.name: task for task in (SequenceClassification, CausalLanguageModelling)}


def accuracy_eval(encodings: dict, label_ids: torch.Tensor, batch_size: int = 64):
    """``evaluate(model)`` → held-out accuracy and mean cross-entropy of a classifier."""
    def evaluate(model) -> dict:
        device = model_device(model)
        correct, loss = 0, 0.0
        for start in range(0, len(label_ids), batch_size):
            batch = {k: v[start : start + batch_size].to(device) for k, v in encodings.items()}
            labels = label_ids[start : start + batch_size].to(device)
            logits = model(**batch).logits.float()
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        n = len(label_ids)
        return {"accuracy": correct / n, "loss": loss / n, "n": n}
    return evaluate


def token_loss_eval(batches: list[dict]):
    """``evaluate(model)`` → mean cross-entropy per target token of held-out examples and its
    perplexity (``exp(loss)``)."""
    def evaluate(model) -> dict:
        device = model_device(model)
        total, tokens, n = 0.0, 0, 0
        for batch in batches:
            labels = batch["labels"].to(device)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.float()  # (batch, seq, vocab)
            # position t predicts token t + 1
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                           ignore_index=IGNORE, reduction="sum"))
            tokens += int((labels[:, 1:] != IGNORE).sum())
            n += len(labels)
        loss = total / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "n": n}
    return evaluate
