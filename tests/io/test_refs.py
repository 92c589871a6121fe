"""Checkpoint reference strings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dora_analysis.cli import main
from dora_analysis.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    SkippedFoldersWarning,
)
from dora_analysis.io.refs import CheckpointRef, series_steps


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


def _run(tmp_path: Path, *names: str) -> Path:
    run = tmp_path / "run"
    for name in names:
        (run / name).mkdir(parents=True)
    return run


def test_torchtitan_step_folders_are_a_series(tmp_path):
    run = _run(tmp_path, "step-20", "step-100", "step-3")
    ref = CheckpointRef.parse(str(run))
    assert ref.kind == "series"
    assert [s for s, _ in series_steps(run)] == [3, 20, 100]


@pytest.mark.parametrize("names", [("checkpoint-10", "checkpoint-010"),
                                   ("step-10", "checkpoint-10")])
def test_duplicate_steps_name_both_folders(tmp_path, names):
    run = _run(tmp_path, "checkpoint-5", *names)
    with pytest.raises(CheckpointFormatError, match="two checkpoints for step 10") as info:
        CheckpointRef.parse(str(run))
    assert all(f"{n}/" in str(info.value) for n in names)


def test_unnumbered_step_folders_are_warned_about(tmp_path):
    run = _run(tmp_path, "checkpoint-5", "checkpoint-abc", "step-final", "logs")
    with pytest.warns(SkippedFoldersWarning, match="checkpoint-abc, step-final"):
        assert CheckpointRef.parse(str(run)).kind == "series"


def test_unnumbered_step_folder_in_the_cli(ckpts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ckpts["series"], run)
    (run / "checkpoint-best").mkdir()
    assert main([str(ckpts["base"]), str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "checkpoint-best skipped" in err

    (run / "step-10").mkdir()
    assert main([str(ckpts["base"]), str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "checkpoint-10/ and step-10/" in err


@pytest.mark.parametrize("path, step, label", [
    ("run/checkpoint-20/pytorch_model_fsdp_0", 20, "run"),  # Trainer + FSDP: DCP inside
    ("out/checkpoint/step-300", 300, "out"),  # torchtitan
    ("ds/global_step7", 7, "ds"),  # DeepSpeed
    ("run/checkpoint-4/global_step4", 4, "run"),  # Trainer + DeepSpeed
])
def test_steps_and_labels_of_inner_folders(tmp_path, path, step, label):
    (tmp_path / path).mkdir(parents=True)
    ref = CheckpointRef.parse(str(tmp_path / path))
    assert (ref.kind, ref.step, ref.default_label) == ("folder", step, label)
