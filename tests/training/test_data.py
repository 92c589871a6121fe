"""Causal-LM data: labels on the response / assistant turns only, truncation named, bad files
refused with the line; classification batches unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from dora_analysis.errors import TrainingDataError, TruncationWarning
from dora_analysis.training.data import (
    IGNORE,
    causal_batches,
    collate,
    encode_causal,
    fit,
    shuffled_batches,
)

transformers = pytest.importorskip("transformers")
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return transformers.AutoTokenizer.from_pretrained(tiny_llama)


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_response_loss_covers_the_response_and_eos_only(tmp_path, tokenizer):
    data = write(tmp_path / "d.jsonl", [{"prompt": "what is two plus two?",
                                         "response": "four, of course."}])
    (ex,) = encode_causal(data, tokenizer, 64)
    prompt, response = ids(tokenizer, "what is two plus two?"), ids(tokenizer, "four, of course.")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ex.input_ids == [bos, *prompt, *response, eos]
    assert ex.labels == [IGNORE] * (1 + len(prompt)) + response + [eos]
    assert ex.line == 1


def test_text_loss_covers_every_token(tmp_path, tokenizer):
    data = write(tmp_path / "d.jsonl", ["", {"text": "a plain sentence."}])  # blank line skipped
    (ex,) = encode_causal(data, tokenizer, 64)
    body = ids(tokenizer, "a plain sentence.")
    assert ex.labels == [IGNORE, *body, tokenizer.eos_token_id] and ex.line == 2


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and you"},
        {"role": "assistant", "content": "fine thanks"}]


def labelled_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels, strict=True)
                             if label != IGNORE])


def test_messages_without_template_use_plain_lines_and_learn_assistant_turns(tmp_path, tokenizer):
    assert not tokenizer.chat_template
    data = write(tmp_path / "d.jsonl", [{"messages": CHAT}])
    (ex,) = encode_causal(data, tokenizer, 128)
    whole = tokenizer.decode(ex.input_ids)
    assert whole.startswith("[CLS] system : be brief user : hi there assistant : hello")
    # the replies (with their line ends) and the final eos, nothing of the other turns
    assert labelled_text(tokenizer, ex) == "hello fine thanks [SEP]"


def test_messages_with_the_tokenizers_chat_template(tmp_path, tokenizer):
    templated = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = TEMPLATE
    data = write(tmp_path / "d.jsonl", [{"messages": CHAT}])
    (ex,) = encode_causal(data, templated, 128)
    assert ex.input_ids == ids(templated, templated.apply_chat_template(CHAT, tokenize=False))
    # each reply and its end marker; not the <|assistant|> header the prompt already has
    assert labelled_text(templated, ex) == "hello < / s > fine thanks < / s >"


def test_long_examples_are_truncated_with_a_named_warning_never_dropped(tmp_path, tokenizer):
    long_response = " ".join(["word"] * 40)
    data = write(tmp_path / "d.jsonl", [
        {"prompt": "short", "response": "ok"},
        {"prompt": "question", "response": long_response},  # line 2: response cut
        {"prompt": " ".join(["context"] * 40), "response": "yes"},  # line 3: prompt too long
    ])
    with pytest.warns(TruncationWarning, match=r"d.jsonl: 2 of 3 examples are longer than "
                                               r"--max-length 16 tokens .* \(line 2, 3\)"):
        examples = encode_causal(data, tokenizer, 16)
    assert len(examples) == 3 and all(len(e.input_ids) <= 16 for e in examples)
    assert examples[1].labels[-1] != IGNORE  # the response fills the rest
    kept = labelled_text(tokenizer, examples[2])
    assert kept == "yes [SEP]"  # the prompt's start gave way to the response


def test_fit_keeps_half_a_context_before_the_first_target():
    ids = list(range(30))
    labels = [IGNORE] * 25 + list(range(25, 30))
    cut_ids, cut_labels = fit(ids, labels, 10)
    assert cut_ids == list(range(20, 30)) and cut_labels[5:] == [25, 26, 27, 28, 29]


@pytest.mark.parametrize("rows, message", [
    ([], "no examples (the file is empty)"),
    ([{"question": "q"}], "line 1 has fields question; each line needs one of: prompt + "
                          "response; messages; text"),
    ([{"prompt": "p", "response": "r"}, {"prompt": "p"}, {"prompt": "p", "response": ""}],
     "2 line(s) unusable as prompt + response: line 2 (response missing or not a string), "
     "line 3 (response empty)"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "line 1 (no assistant message"),
    ([{"messages": [{"role": "user"}]}], "line 1 (each message needs a string role and content)"),
    (["{not json"], "line 1 is not JSON"),
    (["[1, 2]"], "line 1 is not a JSON object"),
])
def test_bad_files_are_refused_naming_the_lines(tmp_path, tokenizer, rows, message):
    data = write(tmp_path / "d.jsonl", rows) if rows else tmp_path / "d.jsonl"
    if not rows:
        data.write_text("\n\n")
    with pytest.raises(TrainingDataError) as caught:
        encode_causal(data, tokenizer, 32)
    assert str(caught.value).startswith(f"{data}: ") and message in str(caught.value)


def test_a_missing_file_and_a_csv_are_refused(tmp_path, tokenizer):
    with pytest.raises(TrainingDataError, match="no such data file"):
        encode_causal(tmp_path / "none.jsonl", tokenizer, 32)
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(TrainingDataError, match="causal-lm data must be .jsonl"):
        encode_causal(tmp_path / "d.csv", tokenizer, 32)


def test_batches_pad_on_the_right_with_ignored_labels(tmp_path, tokenizer):
    data = write(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "one two three four"}])
    examples = encode_causal(data, tokenizer, 32)
    batch = collate(examples, tokenizer.pad_token_id)
    n0 = len(examples[0].input_ids)
    assert batch["input_ids"].shape == (2, len(examples[1].input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1]
                                                                     - n0)
    assert (batch["labels"][0, n0:] == IGNORE).all()
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()
    batch_at = causal_batches(examples, tokenizer.pad_token_id, 3, seed=0)
    assert batch_at(0)["input_ids"].shape[0] == 3  # wraps into the next epoch


def test_every_example_once_per_epoch_and_the_order_fixed_by_the_seed():
    indices_at = shuffled_batches(10, 4, seed=3)
    first_epoch = indices_at(0) + indices_at(1) + indices_at(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert indices_at(1) == shuffled_batches(10, 4, seed=3)(1)
    assert indices_at(0) != shuffled_batches(10, 4, seed=4)(0)
    assert torch.is_tensor(torch.tensor(indices_at(5)))


# -- reading the files (records.py) ---------------------------------------------------------------
def test_classification_rows_from_csv_keep_their_text_and_name_their_lines(tmp_path):
    from dora_analysis.training.records import read_classification

    data = tmp_path / "d.csv"
    data.write_text('text,label\n"two\nlines, quoted",pos\n007,neg\nshort\n', encoding="utf-8")
    with pytest.raises(TrainingDataError, match=r"d.csv: 1 row\(s\) unusable: line 5 \(label "
                                                r"missing\)"):
        read_classification(data, "text", "label")
    data.write_text('text,label\n"two\nlines, quoted",pos\n007,neg\n', encoding="utf-8")
    # CSV text stays text: 007 is not read as the number 7
    assert read_classification(data, "text", "label") == (["two\nlines, quoted", "007"],
                                                          ["pos", "neg"])


def test_a_json_array_is_told_apart_from_jsonl(tmp_path):
    from dora_analysis.training.records import read_classification

    data = tmp_path / "d.json"
    data.write_text('[\n {"text": "a", "label": 1}\n]\n')
    with pytest.raises(TrainingDataError, match="d.json: a JSON array; give one JSON object a "
                                                r"line \(JSONL\)"):
        read_classification(data, "text", "label")


@pytest.mark.parametrize("value, name", [(1, "1"), (1.0, "1"), ("pos", "pos"), (True, "True"),
                                         (0.5, None), (float("nan"), None), ([1], None),
                                         ("", None), (None, None)])
def test_label_names(value, name):
    from dora_analysis.training.records import label_name

    assert label_name(value) == name


def test_a_line_whose_only_target_is_the_first_token_is_refused(tmp_path, tokenizer):
    """Position 0 predicts nothing (the model shifts labels by one): no target there."""
    data = write(tmp_path / "d.jsonl", [{"text": "hello"}])
    bare = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.bos_token, bare.eos_token = None, None
    bare.bos_token_id = bare.eos_token_id = None
    ids = bare("hello", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    with pytest.raises(TrainingDataError, match="line 1 has no token to learn from"):
        encode_causal(data, bare, 32)
