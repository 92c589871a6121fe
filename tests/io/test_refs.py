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


def test_missing_local_path_is_never_sent_to_the_hub(tmp_path, monkeypatch, ckpts, capsys):
    """``ft/checkpoint-3`` when ``ft/`` is here: a missing local path (listing what ``ft/``
    holds), not a Hub repo id reported as a cache miss."""
    _run(tmp_path, "checkpoint-1", "checkpoint-2")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"run/checkpoint-3: no such file or folder "
                                                      r"\(run/ holds checkpoint-1, checkpoint-2"):
        CheckpointRef.parse("run/checkpoint-3")
    assert CheckpointRef.parse("org/name").kind == "hub"  # no org/ here: a Hub id as before
    assert main([str(ckpts["base"]), "run/checkpoint-3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run/checkpoint-3: no such file") and err.count("\n") == 1
    assert "HF_HUB" not in err and "cache" not in err


def test_run_folder_as_base_names_a_checkpoint(ckpts, capsys):
    assert main([str(ckpts["series"]), str(ckpts["tuned"]), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "a training run folder (3 checkpoints: checkpoint-10, checkpoint-20, checkpoint-30)" \
        in err and str(ckpts["series"] / "checkpoint-10") in err


def test_sharded_variant_checkpoints(ckpts, tmp_path):
    """transformers' ``save_pretrained(variant="fp16")``: ``model.safetensors.index.fp16.json``
    with ``model.fp16-0000N-of-0000M.safetensors`` shards, or one ``model.fp16.safetensors``;
    read like the plain names (the folder, or the index itself). Two variants: say which."""
    import dora_analysis as da
    from dora_analysis import columns as C

    pm = pytest.importorskip("tests.peft_models")
    base, tuned = pm.tiny_llama(0), pm.tiny_llama(1)
    base.save_pretrained(str(tmp_path / "base"))
    tuned.save_pretrained(str(tmp_path / "plain"))
    tuned.save_pretrained(str(tmp_path / "sharded"), variant="fp16", max_shard_size="20KB")
    tuned.save_pretrained(str(tmp_path / "single"), variant="bf16")
    assert (tmp_path / "sharded" / "model.safetensors.index.fp16.json").is_file()
    ref = da.analyze(tmp_path / "base", tmp_path / "plain")
    for tuned_ref in (tmp_path / "sharded", tmp_path / "sharded" /
                      "model.safetensors.index.fp16.json", tmp_path / "single"):
        table = da.analyze(tmp_path / "base", tuned_ref)
        assert table[C.DELTA_D].tolist() == ref[C.DELTA_D].tolist()
    for f in (tmp_path / "single").iterdir():
        shutil.copy(f, tmp_path / "sharded")
    with pytest.raises(CheckpointFormatError, match="holds 2 variants of the weights"):
        da.analyze(tmp_path / "base", tmp_path / "sharded")
