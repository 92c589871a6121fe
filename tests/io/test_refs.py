"""Checkpoint reference strings."""

from __future__ import annotations

import pytest

from dora_analysis.errors import CheckpointNotFoundError
from dora_analysis.io.refs import CheckpointRef


def test_file_folder_series_kinds(ckpts):
    assert CheckpointRef.parse(str(ckpts["base"])).kind == "file"
    assert CheckpointRef.parse(str(ckpts["sharded"])).kind == "folder"
    assert CheckpointRef.parse(str(ckpts["series"])).kind == "series"


def test_printed_back_the_same(ckpts):
    text = str(ckpts["series"]) + "/"
    assert str(CheckpointRef.parse(text)) == text


def test_labels(ckpts):
    assert CheckpointRef.parse(str(ckpts["base"])).default_label == "base"
    assert CheckpointRef.parse(str(ckpts["sharded"])).default_label == "tuned_sharded"
    step_dir = ckpts["series"] / "checkpoint-20"
    ref = CheckpointRef.parse(str(step_dir))
    assert (ref.default_label, ref.step) == ("run", 20)
    ref = CheckpointRef.parse(str(step_dir / "model.safetensors"))
    assert (ref.default_label, ref.step) == ("run", 20)


def test_hub_reference():
    ref = CheckpointRef.parse("meta-llama/Llama-2-7b-hf@abc123")
    assert (ref.kind, ref.repo, ref.revision) == ("hub", "meta-llama/Llama-2-7b-hf", "abc123")
    assert ref.default_label == "Llama-2-7b-hf"


def test_existing_local_path_wins_over_hub(tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    monkeypatch.chdir(tmp_path)
    assert CheckpointRef.parse("org/name").kind == "folder"


@pytest.mark.parametrize("text", ["./missing.safetensors", "/no/such/dir/", "no_such_file.bin"])
def test_missing_path(text):
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        CheckpointRef.parse(text)
