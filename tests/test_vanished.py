"""Checkpoints that vanish while a series is read (a trainer's save_total_limit rotation): an
error naming the checkpoint, or (skip_vanished / --skip-vanished) the others analysed with a
warning — whether it goes before it is opened, while it is read, or at a random moment."""

from __future__ import annotations

import random
import shutil
import threading
import time
import warnings

import pandas as pd
import pytest
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import executors
from dora_analysis import plan as planning
from dora_analysis.cli import main
from dora_analysis.errors import VanishedCheckpointError, VanishedCheckpointWarning
from tests.common import llama_state, perturb

STEPS = (10, 20, 30, 40)


@pytest.fixture
def run(tmp_path):
    base = llama_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    for step in STEPS:
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(perturb(base, 0.001 * step, seed=step), str(folder / "model.safetensors"))
    (tmp_path / "run" / "checkpoint-20" / "config.json").write_text("{}")
    return tmp_path / "base.safetensors", tmp_path / "run"


def alone(base, run, steps) -> pd.DataFrame:
    """The rows of these steps, analysed on their own."""
    return da.analyze(base, [run / f"checkpoint-{s}" for s in steps], labels=[run.name])


def same_rows(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    numbers = ["step", "name", "axis", "delta_m", "delta_d", "tangential_fraction"]
    pd.testing.assert_frame_equal(table[numbers].reset_index(drop=True),
                                  expected[numbers].reset_index(drop=True), check_exact=True)


def vanish_when(module, name: str, folder, *, after: int = 0):
    """Wrap ``module.name`` so that ``folder`` is deleted when it is called with it for the
    ``after``-th time (0: the first)."""
    real, seen = getattr(module, name), []

    def wrapper(*args, **kwargs):
        if any(folder in str(a) for a in args if isinstance(a, str) or hasattr(a, "parts")):
            seen.append(1)
            if len(seen) == after + 1:
                shutil.rmtree(folder)
        return real(*args, **kwargs)
    return wrapper


def test_a_checkpoint_gone_before_it_is_opened(run, monkeypatch):
    base, folder = run
    gone = folder / "checkpoint-20"
    monkeypatch.setattr(planning, "open_tuned",
                        vanish_when(planning, "open_tuned", str(gone)))
    with pytest.raises(VanishedCheckpointError, match=r"checkpoint-20: checkpoint vanished while "
                       r"being read \(deleted; a trainer's save_total_limit rotates old "
                       r"checkpoints away\); --skip-vanished"):
        da.analyze(base, folder)


def test_skip_vanished_analyses_the_others_with_a_warning(run, monkeypatch):
    base, folder = run
    expected = alone(base, folder, (10, 30, 40))
    gone = folder / "checkpoint-20"
    monkeypatch.setattr(planning, "open_tuned",
                        vanish_when(planning, "open_tuned", str(gone)))
    with pytest.warns(VanishedCheckpointWarning, match=r"checkpoint-20: checkpoint vanished "
                      r"while being read .*left out, the others analysed"):
        table = da.analyze(base, folder, skip_vanished=True)
    assert sorted(set(table["step"])) == [10, 30, 40]
    same_rows(table, expected)


def test_a_checkpoint_deleted_while_its_pairs_are_computed(run, monkeypatch):
    base, folder = run
    expected = alone(base, folder, (10, 30, 40))
    gone = folder / "checkpoint-20"
    real, calls = executors.compute_unit, []

    def compute(unit, work, *args, **kwargs):  # the run's 5th pair of checkpoint-20: midway
        calls.append((unit.job, unit.pair))
        if work.jobs[unit.job].checkpoint.step == 20 and unit.pair == 4 and gone.exists():
            shutil.rmtree(gone)
        return real(unit, work, *args, **kwargs)
    monkeypatch.setattr(executors, "compute_unit", compute)
    with pytest.raises(VanishedCheckpointError, match="checkpoint-20: checkpoint vanished"):
        da.analyze(base, folder, workers=1)
    save_file(perturb(llama_state(0), 0.02, seed=20), str(folder / "gone.safetensors"))
    (gone).mkdir()
    shutil.move(folder / "gone.safetensors", gone / "model.safetensors")
    calls.clear()
    with pytest.warns(VanishedCheckpointWarning):
        table = da.analyze(base, folder, workers=1, skip_vanished=True)
    same_rows(table, expected)
    # the pairs computed before the checkpoint went are not computed again: 3 × 23 and the
    # 5 pairs of checkpoint-20 (the last of which failed)
    assert len(calls) == 3 * 23 + 5


def test_a_deleter_racing_the_analysis(run):
    """A thread rotating checkpoints away, as a Trainer's save_total_limit does, at random
    moments of a threaded analysis: it never fails, never holds part of a checkpoint, and every
    checkpoint that stayed has its rows."""
    base, folder = run
    complete = {s: alone(base, folder, (s,)) for s in STEPS}
    started = time.monotonic()
    da.analyze(base, folder, workers=2)
    full = time.monotonic() - started  # deletions at random moments within such a run
    copies = folder.parent / "copies"
    shutil.copytree(folder, copies)
    rng = random.Random(3)
    warned = 0
    for attempt in range(6):
        shutil.rmtree(folder)
        shutil.copytree(copies, folder)
        victims = rng.sample(STEPS, 2)
        delay = rng.uniform(0.0, full)

        def rotate(delay=delay, victims=victims):
            time.sleep(delay)
            for step in victims:
                shutil.rmtree(folder / f"checkpoint-{step}")

        deleter = threading.Thread(target=rotate)
        deleter.start()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", VanishedCheckpointWarning)
            table = da.analyze(base, folder, workers=2, skip_vanished=True)
        deleter.join()
        warned += any(w.category is VanishedCheckpointWarning for w in caught)
        for step in STEPS:
            rows = table[table["step"] == step]
            if step not in victims:
                same_rows(rows, complete[step])
            else:
                assert rows.empty or len(rows) == len(complete[step]), attempt
                if not rows.empty:  # read before it went: whole
                    same_rows(rows, complete[step])
    assert warned  # some went while the analysis read them, not only before it listed them


def test_the_command_line_names_it_and_skips_it_on_request(run, monkeypatch, capsys):
    base, folder = run
    gone = folder / "checkpoint-20"
    copy = folder.parent / "copy-20"
    shutil.copytree(gone, copy)
    monkeypatch.setattr(planning, "open_tuned",
                        vanish_when(planning, "open_tuned", str(gone)))
    assert main([str(base), str(folder), "--no-cache"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {gone}: checkpoint vanished"), err
    shutil.copytree(copy, gone)
    monkeypatch.setattr(planning, "open_tuned",
                        vanish_when(planning, "open_tuned", str(gone)))
    assert main([str(base), str(folder), "--no-cache", "--skip-vanished", "-q"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {gone}: checkpoint vanished while being read (deleted; rotated "
                   "away by the trainer?); left out, the others analysed"]


def test_a_damaged_checkpoint_is_not_taken_for_a_vanished_one(run):
    base, folder = run
    (folder / "checkpoint-30" / "model.safetensors").write_bytes(b"junk")
    started = time.monotonic()
    with pytest.raises(da.DoraAnalysisError, match="not a readable safetensors file"):
        da.analyze(base, folder, skip_vanished=True)
    assert time.monotonic() - started < 10  # waited for a deletion at most GRACE_S


def test_only_steps_of_a_series_vanish(run, tmp_path, monkeypatch):
    """A tuned file that is not a step of a run, gone after planning, is the reader's error."""
    base, folder = run
    single = tmp_path / "single.safetensors"
    shutil.copy(folder / "checkpoint-10" / "model.safetensors", single)
    planned = planning.plan

    def plan_then_delete(*args, **kwargs):
        work = planned(*args, **kwargs)
        single.unlink()
        return work

    monkeypatch.setattr(planning, "plan", plan_then_delete)
    with pytest.raises(da.DoraAnalysisError) as exc:
        da.analyze(base, single, skip_vanished=True)
    assert not isinstance(exc.value, VanishedCheckpointError) and str(single) in str(exc.value)


def test_a_folder_deleted_while_its_format_is_told_is_a_not_found_error(tmp_path, monkeypatch):
    """Found by the race above: a checkpoint folder emptied and removed while open_checkpoint
    looked into it gave a raw FileNotFoundError from a listing, which no caller expected."""
    from dora_analysis.errors import CheckpointNotFoundError
    from dora_analysis.io import open as opening

    folder = tmp_path / "run" / "checkpoint-30"
    folder.mkdir(parents=True)  # its files already gone, the folder next

    def listing_a_deleted_folder(path):
        shutil.rmtree(path)
        return list(path.iterdir())

    monkeypatch.setattr(opening, "series_steps", listing_a_deleted_folder)
    with pytest.raises(CheckpointNotFoundError, match="checkpoint-30: no such file or folder"):
        opening.open_checkpoint(folder)


@pytest.mark.parametrize("layout", ["model-folder", "dcp"])
def test_files_gone_between_telling_the_format_and_opening_it(tmp_path, monkeypatch, layout):
    """Found by the race above: the format was told from a file that was gone when the folder
    was opened (AttributeError on None)."""
    from dora_analysis.errors import CheckpointNotFoundError
    from dora_analysis.io import open as opening

    folder = tmp_path / "checkpoint-30"
    folder.mkdir()
    name = "_model_folder_file" if layout == "model-folder" else "find_dcp"
    calls = []

    def found_then_gone(path):  # what a second look finds once the files are deleted
        calls.append(path)
        return folder / "x" if len(calls) == 1 else None

    monkeypatch.setattr(opening, name, found_then_gone)
    monkeypatch.setattr(opening, "FORMATS", [f for f in opening.FORMATS if f.name == layout])
    with pytest.raises(CheckpointNotFoundError, match="checkpoint-30: its weight files went "
                                                      "while it was opened"):
        opening.open_checkpoint(folder)
