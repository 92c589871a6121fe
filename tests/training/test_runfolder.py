"""One run per --output folder: a new run does not mix with the checkpoints and eval_results.json
of an earlier one, a resumed run keeps the steps up to its checkpoint and none after."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dora_analysis.training.cli import main

pytest.importorskip("transformers")


def qa(path: Path, n: int = 8) -> Path:
    path.write_text("\n".join(json.dumps({"prompt": f"what is {i}?", "response": f"it is {i}."})
                              for i in range(n)))
    return path


def dora_train(tiny_llama, tmp_path, out, steps, save, *extra) -> int:
    data = qa(tmp_path / "qa.jsonl")
    return main(["--task", "causal-lm", "--model", str(tiny_llama), "--data", str(data),
                 "--eval-data", str(data), "--method", "lora", "--lr", "1e-2",
                 "--steps", str(steps), "--save-steps", save, "--batch-size", "2",
                 "--output", str(out), "-q", *extra])


def steps_listed(out: Path) -> list[int]:
    return [e["step"] for e in json.loads((out / "eval_results.json").read_text())]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, tiny_llama):
    """An earlier run of 6 steps that saved and scored steps 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("earlier")
    assert dora_train(tiny_llama, tmp, tmp / "run", 6, "2,4") == 0
    assert steps_listed(tmp / "run") == [2, 4, 6]
    return tmp / "run"


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    return tmp_path / "run"


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path, capsys, tiny_llama, earlier):
    out = copy_of(earlier, tmp_path)
    assert dora_train(tiny_llama, tmp_path, out, 2, "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output {out}: holds the outputs of another run (checkpoint-2, "
                   "checkpoint-4, checkpoint-6, eval_results.json); give a new run a folder of "
                   "its own, continue that run with --resume OUTPUT/checkpoint-N, or pass "
                   "--overwrite to delete them"]
    assert steps_listed(out) == [2, 4, 6]  # untouched


def test_overwrite_starts_afresh_and_says_what_it_deleted(tmp_path, capsys, tiny_llama,
                                                          earlier):
    out = copy_of(earlier, tmp_path)
    assert dora_train(tiny_llama, tmp_path, out, 2, "1", "--overwrite") == 0
    assert (f"warning: --overwrite: deleted checkpoint-2, checkpoint-4, checkpoint-6, "
            f"eval_results.json of an earlier run from {out}") in capsys.readouterr().err
    assert steps_listed(out) == [1, 2]  # only this run's steps (it was 1, 2, 4, 6)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2",
                                                     "eval_results.json", "notes.txt"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert len(state["log_history"]) == 2  # the new run's checkpoint-2, not the old one


def test_a_resumed_run_keeps_the_steps_up_to_its_checkpoint(tmp_path, capsys, tiny_llama,
                                                            earlier):
    out = copy_of(earlier, tmp_path)
    before = json.loads((out / "eval_results.json").read_text())
    resume = ["--resume", str(out / "checkpoint-2")]
    assert dora_train(tiny_llama, tmp_path, out, 5, "3", *resume) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output {out}: holds checkpoint-4, checkpoint-6, saved after the resumed step "
        "2 by the continuation this run replaces; pass --overwrite to delete them, or resume the "
        "latest checkpoint")
    assert dora_train(tiny_llama, tmp_path, out, 5, "3", *resume, "--overwrite") == 0
    evals = json.loads((out / "eval_results.json").read_text())
    assert [e["step"] for e in evals] == [2, 3, 5]  # it was 2, 3, 4, 5, 6: 4 and 6 stale
    assert evals[0] == before[0]  # step 2 is the resumed run's own
    assert not (out / "checkpoint-6").exists() and (out / "notes.txt").read_text() == "mine"


def test_continuing_from_the_last_checkpoint_needs_no_flag(tmp_path, tiny_llama, earlier):
    out = copy_of(earlier, tmp_path)
    assert dora_train(tiny_llama, tmp_path, out, 8, "7", "--resume",
                      str(out / "checkpoint-6")) == 0
    assert steps_listed(out) == [2, 4, 6, 7, 8]


def test_the_list_is_up_to_date_after_every_save(tmp_path, tiny_llama, monkeypatch):
    """An interrupted run's eval_results.json lists the steps it saved."""
    from dora_analysis.training import loop

    saves = []
    real = loop.save_checkpoint

    def stop_at_the_third(*args, **kwargs):
        if len(saves) == 2:
            raise KeyboardInterrupt
        saves.append(real(*args, **kwargs))
        return saves[-1]

    monkeypatch.setattr(loop, "save_checkpoint", stop_at_the_third)
    assert dora_train(tiny_llama, tmp_path, tmp_path / "run", 6, "1,2") == 130
    assert steps_listed(tmp_path / "run") == [1, 2]
