"""Training data: tokenizing the checked records of :mod:`.records` for each task, and batching.

Causal language modelling reads JSONL, one example per line, in one of three shapes:

* ``{"prompt": …, "response": …}``: the loss covers the response (and the end-of-sequence
  token) only; the prompt is context.
* ``{"messages": [{"role": …, "content": …}, …]}``: rendered with the tokenizer's chat template
  when it has one, else as plain ``role: content`` lines; the loss covers the assistant replies.
* ``{"text": …}``: the loss covers every token.

Labels are ``-100`` (ignored by the loss) on the context and on padding. An example longer than
``max_length`` tokens is truncated (never dropped) with a :class:`TruncationWarning` naming its
lines.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TrainingDataError, TruncationWarning, listing
from .records import Record, read_causal

IGNORE = -100  # the label the cross-entropy of transformers models ignores
Tokenized = tuple[list[int], list[int]]
"""An example's token ids and labels."""


# -- batching ------------------------------------------------------------------------------
def shuffled_batches(n: int, batch_size: int, seed: int) -> Callable[[int], list[int]]:
    """``indices_at(i)``: the example indices of micro-batch i in a reshuffle-every-epoch order
    fixed by the seed (so a resumed run sees the same batches)."""
    def indices_at(i: int) -> list[int]:
        start, index = i * batch_size, []
        while len(index) < batch_size:
            epoch, offset = divmod(start + len(index), n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            index += order[offset : offset + batch_size - len(index)].tolist()
        return index
    return indices_at


def for_rank(batch_at: Callable[[int], dict], rank: int, world_size: int):
    """Micro-batch ``i`` of process ``rank``: every process sees different examples."""
    return lambda i: batch_at(i * world_size + rank)


# -- sequence classification ---------------------------------------------------------------
def classification_batches(encodings: dict, label_ids: torch.Tensor, batch_size: int, seed: int):
    """``batch_at(i)`` over pre-padded classification encodings."""
    indices_at = shuffled_batches(len(label_ids), batch_size, seed)

    def batch_at(i: int) -> dict:
        idx = torch.tensor(indices_at(i))
        return {k: v[idx] for k, v in encodings.items()} | {"labels": label_ids[idx]}

    return batch_at


# -- causal language modelling -------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One tokenized example; ``line`` is its line in the data file."""

    input_ids: list[int]
    labels: list[int]
    line: int


FALLBACK_CHAT = "{role}: {content}\n"
"""How a conversation is written for a tokenizer without a chat template (one line a message)."""


def _ends(tokenizer) -> tuple[list[int], list[int]]:
    """The tokenizer's begin- and end-of-sequence ids, each as a 0- or 1-element list."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ([] if bos is None else [bos]), ([] if eos is None else [eos])


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def tokenize_prompt_response(tokenizer, records: Sequence[Record]) -> list[Tokenized]:
    """``[bos] prompt response [eos]``; labels on the response and eos."""
    bos, eos = _ends(tokenizer)
    prompts = _ids(tokenizer, [r["prompt"] for _, r in records])
    responses = _ids(tokenizer, [r["response"] for _, r in records])
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        context, target = bos + prompt, response + eos
        out.append((context + target, [IGNORE] * len(context) + target))
    return out


def tokenize_text(tokenizer, records: Sequence[Record]) -> list[Tokenized]:
    """``[bos] text [eos]``; labels on every token."""
    bos, eos = _ends(tokenizer)
    out = []
    for ids in _ids(tokenizer, [r["text"] for _, r in records]):
        out.append((bos + ids + eos, [IGNORE] * len(bos) + ids + eos))
    return out


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]], bool]:
    """A conversation as text, the character spans of its assistant replies, and whether the
    text came from the tokenizer's chat template (else :data:`FALLBACK_CHAT` lines)."""
    templated = bool(getattr(tokenizer, "chat_template", None))

    def render(part: list[dict], reply_next: bool = False) -> str:
        if templated:
            if not part and not reply_next:
                return ""
            try:
                return tokenizer.apply_chat_template(part, tokenize=False,
                                                     add_generation_prompt=reply_next)
            except Exception as exc:  # a template is code of its own: it can raise anything
                first = (str(exc).splitlines() or [""])[0]
                raise TrainingDataError(f"the tokenizer's chat template fails on this "
                                        f"conversation ({type(exc).__name__}: {first}); fix "
                                        "the conversation or the template") from None
        text = "".join(FALLBACK_CHAT.format(role=m["role"], content=m["content"]) for m in part)
        return text + ("assistant: " if reply_next else "")

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(messages[:i], reply_next=True), render(messages[: i + 1])
        if not (full.startswith(start) and full.startswith(end)):
            raise TrainingDataError("the tokenizer's chat template does not render a "
                                    "conversation's beginning as a prefix of the whole; give "
                                    "prompt/response or text lines instead")
        spans.append((len(start), len(end)))
    return full, spans, templated


def tokenize_messages(tokenizer, records: Sequence[Record]) -> list[Tokenized]:
    """Chat-templated conversations; labels on the tokens of assistant replies."""
    bos, eos = _ends(tokenizer)
    out = []
    for number, record in records:
        messages = record["messages"]
        try:
            text, spans, templated = render_chat(tokenizer, messages)
        except TrainingDataError as exc:
            raise TrainingDataError(f"line {number}: {exc}") from None
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE
                  for tok, (start, _) in zip(ids, encoded["offset_mapping"], strict=True)]
        if not templated:  # the template brings its own markers; plain lines get bos/eos
            last_is_reply = messages[-1]["role"] == "assistant"
            ids, labels = bos + ids + eos, [IGNORE] * len(bos) + labels + (
                eos if last_is_reply else [IGNORE] * len(eos))
        out.append((ids, labels))
    return out


CAUSAL_TOKENIZERS = {
    "prompt-response": tokenize_prompt_response,
    "messages": tokenize_messages,
    "text": tokenize_text,
}


def fit(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut an example to ``max_length`` tokens, keeping learnable tokens: from the end if some
    target survives that, else a window that starts half a context before the first target."""
    if len(ids) <= max_length:
        return ids, labels
    first = next((i for i, label in enumerate(labels) if label != IGNORE), 0)
    start = 0 if first < max_length else first - max_length // 2
    return ids[start : start + max_length], labels[start : start + max_length]


def encode_causal(path: Path, tokenizer, max_length: int) -> list[Example]:
    """Read, check and tokenize a causal-LM JSONL file (see the module docstring)."""
    kind, records = read_causal(path)
    return encode_records(path, kind, records, tokenizer, max_length)


def encode_records(path: Path, kind: str, records: Sequence[Record], tokenizer,
                   max_length: int) -> list[Example]:
    """Tokenize the checked records of a causal-LM file of shape ``kind`` (:func:`read_causal`);
    a conversation the chat template cannot render, or a line left without a target, is an
    error naming the line."""
    try:
        tokenized = CAUSAL_TOKENIZERS[kind](tokenizer, records)
    except TrainingDataError as exc:
        raise TrainingDataError(f"{path}: {exc}") from None
    examples, cut = [], []
    for (number, _), (ids, labels) in zip(records, tokenized, strict=True):
        if len(ids) > max_length:
            cut.append(f"{number}")
            ids, labels = fit(ids, labels, max_length)
        if all(label == IGNORE for label in labels[1:]):  # position 0 predicts nothing
            raise TrainingDataError(f"{path}: line {number} has no token to learn from")
        examples.append(Example(ids, labels, number))
    if cut:
        warnings.warn(TruncationWarning(
            f"{path}: {len(cut)} of {len(records)} examples are longer than --max-length "
            f"{max_length} tokens and were truncated (line {listing(cut, 5)}); the loss covers "
            "the tokens kept"), stacklevel=2)
    return examples


def pad_id(tokenizer) -> int:
    """The id padding uses: the pad token, else end-of-sequence, else 0 (never attended)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def collate(examples: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)  # (batch, width)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_batches(examples: Sequence[Example], pad: int, batch_size: int, seed: int):
    """``batch_at(i)``: micro-batch i, padded to its longest example."""
    indices_at = shuffled_batches(len(examples), batch_size, seed)
    return lambda i: collate([examples[j] for j in indices_at(i)], pad)
