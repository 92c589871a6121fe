"""Follow a run: the page re-reads a run that is still being written, analysing only the new
checkpoints, waiting for half-written ones, and following a table a callback keeps rewriting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

import dora_analysis as da
from tests.common import llama_state, perturb

testing = pytest.importorskip("streamlit.testing.v1")
st = pytest.importorskip("streamlit")
PAGE = Path(da.__file__).parent / "app" / "views" / "live.py"


@pytest.fixture
def calls(monkeypatch):
    """Every tuned reference analysed (the cache is emptied first)."""
    st.cache_data.clear()
    seen, real = [], da.analyze

    def analyze(base, tuned, **kwargs):
        seen.append(Path(tuned).name)
        return real(base, tuned, **kwargs)

    monkeypatch.setattr(da, "analyze", analyze)
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    monkeypatch.delenv("DORA_DASHBOARD_ROOT", raising=False)
    return seen


def add_checkpoint(run: Path, step: int, *, half: bool = False) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file(perturb(llama_state(0), 0.01 * step, seed=step), str(folder / "model.safetensors"))
    if half:  # as a trainer leaves it mid-save
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def follow(run: Path, base: str = "") -> testing.AppTest:
    at = testing.AppTest.from_file(str(PAGE), default_timeout=60).run()
    at.text_input[0].input(str(run))
    at.text_input[1].input(base)
    next(b for b in at.button if b.label == "Follow").click()
    return at.run()


def steps(at) -> list[int]:
    return sorted(int(s) for s in at.session_state["table"]["step"].unique())


def test_a_growing_series_is_analysed_one_new_checkpoint_at_a_time(ckpts, tmp_path, calls):
    run = tmp_path / "dora-run"
    for step in (10, 20):
        add_checkpoint(run, step)
    at = follow(run, str(ckpts["base"]))
    assert not at.exception and not at.error
    assert steps(at) == [10, 20] and set(at.session_state["table"]["checkpoint"]) == {"dora-run"}
    assert sorted(calls) == ["checkpoint-10", "checkpoint-20"]
    assert at.toggle[0].value  # keeps refreshing
    assert "2 steps (last 20)" in at.success[0].value

    add_checkpoint(run, 30)
    at.run()  # what the page's timer does
    assert steps(at) == [10, 20, 30]
    assert sorted(calls) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]  # one new

    half = add_checkpoint(run, 40, half=True)
    at.run()
    assert not at.error and steps(at) == [10, 20, 30]
    assert at.info[-1].value == "checkpoint-40 is still being written; retrying"
    (half / "model.safetensors").unlink()
    half.rmdir()
    add_checkpoint(run, 40)
    at.run()
    assert not at.info and steps(at) == [10, 20, 30, 40]


def test_a_checkpoint_broken_long_ago_is_an_error(ckpts, tmp_path, calls):
    run = tmp_path / "run"
    add_checkpoint(run, 10)
    broken = add_checkpoint(run, 20, half=True)
    old = time.time() - 3600
    os.utime(broken / "model.safetensors", (old, old))
    at = follow(run, str(ckpts["base"]))
    assert not at.exception and steps(at) == [10]
    assert "checkpoint-20/model.safetensors: not a readable safetensors file" in at.error[0].value


def test_a_series_needs_its_base(tmp_path, calls):
    add_checkpoint(tmp_path / "run", 10)
    at = follow(tmp_path / "run")
    assert at.error[0].value == "give the base checkpoint the run started from"


def test_a_table_rewritten_by_a_callback(ckpts, tmp_path, calls):
    table = da.analyze(ckpts["base"], ckpts["series"], modules=("q",))
    path = tmp_path / "out" / "dora_analysis.parquet"
    path.parent.mkdir()
    da.write_table(table[table["step"] <= 20], path)
    calls.clear()
    at = follow(path.parent)
    assert not at.exception and not at.error and steps(at) == [10, 20]
    da.write_table(table, path)
    at.run()
    assert steps(at) == [10, 20, 30]
    path.write_bytes(b"PAR1 half a file")  # caught mid-write
    at.run()
    assert not at.error and steps(at) == [10, 20, 30]  # the last good table stays
    assert at.info[-1].value == "dora_analysis.parquet is being written; retrying"
    assert calls == []  # a table is read, never re-analysed


def test_paths_are_confined_here_too(ckpts, tmp_path, calls, monkeypatch):
    monkeypatch.setenv("DORA_DASHBOARD_ROOT", str(tmp_path))
    at = follow(ckpts["series"], "base.safetensors")
    assert "no such file or folder under the data root" in at.error[0].value
    assert "table" not in at.session_state


def mark_saved(folder: Path) -> Path:
    """The file a Hugging Face Trainer writes last into checkpoint-N/: the save is complete."""
    (folder / "trainer_state.json").write_text('{"global_step": 0}')
    return folder


def decoded(values) -> list:
    """Plotly's JSON arrays, plain or base64-packed (``{"dtype": …, "bdata": …}``)."""
    import base64

    import numpy as np

    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), values["dtype"]).tolist()
    return list(values)


def test_one_step_shows_its_values(ckpts, tmp_path, calls):
    import plotly.io

    add_checkpoint(tmp_path / "run", 10)
    at = follow(tmp_path / "run", str(ckpts["base"]))
    assert not at.exception and not at.error
    assert "1 step (last 10)" in at.success[0].value
    (chart,) = at.get("plotly_chart")
    traces = plotly.io.from_json(chart.proto.spec).data
    assert len(traces) == 4  # q and v, ΔM and ΔD: one point each, drawn as a marker
    assert all(decoded(t.x) == [10] and "markers" in t.mode for t in traces)


def test_rotated_checkpoints_keep_their_rows(ckpts, tmp_path, calls):
    import shutil

    run = tmp_path / "run"
    for step in (10, 20):
        add_checkpoint(run, step)
    at = follow(run, str(ckpts["base"]))
    assert steps(at) == [10, 20]
    shutil.rmtree(run / "checkpoint-10")  # save_total_limit=2: the trainer deletes the oldest
    add_checkpoint(run, 30)
    at.run()
    assert not at.error and steps(at) == [10, 20, 30]
    assert "checkpoint-10: no longer in the run folder (rotated away" in at.caption[-1].value
    assert "3 steps (last 30)" in at.success[0].value
    assert sorted(calls) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_a_rewritten_checkpoint_drops_the_rotated_rows_after_it(ckpts, tmp_path, calls):
    """A run restarted in the same folder: its checkpoint-10 replaces the old one, and the old
    run's rotated steps 20 and 30 are not the new run's."""
    import shutil

    run = tmp_path / "run"
    for step in (10, 20, 30):
        add_checkpoint(run, step)
    at = follow(run, str(ckpts["base"]))
    for step in (10, 20, 30):
        shutil.rmtree(run / f"checkpoint-{step}")
    folder = run / "checkpoint-10"
    folder.mkdir()
    save_file(perturb(llama_state(0), 0.5, seed=99), str(folder / "model.safetensors"))
    at.run()
    assert not at.error and steps(at) == [10]
    assert not at.caption or "rotated" not in at.caption[-1].value


@pytest.mark.parametrize("trainer", [True, False])
def test_a_wrong_base_is_an_error_at_once_not_a_checkpoint_being_written(ckpts, tmp_path,
                                                                         calls, trainer):
    other = tmp_path / "other.safetensors"
    save_file({k: v[:, :-1].contiguous() if v.ndim == 2 else v
               for k, v in llama_state(0).items()}, str(other))
    run = tmp_path / "run"
    for step in (10, 20):  # just saved: younger than STILL_WRITING_S
        folder = add_checkpoint(run, step)
        if trainer:
            mark_saved(folder)
    at = follow(run, str(other))
    assert not at.exception and not at.info
    assert len(at.error) == 2 and all("differ in shape" in e.value for e in at.error)
    assert "table" not in at.session_state


def test_a_trainer_checkpoint_without_its_state_file_is_still_being_written(ckpts, tmp_path,
                                                                            calls):
    run = tmp_path / "run"
    mark_saved(add_checkpoint(run, 10))
    folder = run / "checkpoint-20"  # the adapter's weights are there, its config not yet
    folder.mkdir()
    save_file({"base_model.model.x.lora_A.weight": llama_state(0)["lm_head.weight"]},
              str(folder / "adapter_model.safetensors"))
    at = follow(run, str(ckpts["base"]))
    assert not at.error and steps(at) == [10]
    assert at.info[-1].value == "checkpoint-20 is still being written; retrying"


def test_being_written_needs_a_recent_change(tmp_path):
    from dora_analysis.app import follow

    folder = add_checkpoint(tmp_path / "run", 10, half=True)
    from dora_analysis.errors import CheckpointFormatError, TensorMismatchError

    now = time.time()
    assert follow.being_written(folder, CheckpointFormatError("x"), trainer_run=False, now=now)
    assert not follow.being_written(folder, TensorMismatchError("x"), trainer_run=False, now=now)
    assert not follow.being_written(folder, CheckpointFormatError("x"), trainer_run=False,
                                   now=now + follow.STILL_WRITING_S + 1)
    mark_saved(folder)
    assert not follow.being_written(folder, CheckpointFormatError("x"), trainer_run=True, now=now)


def test_a_checkpoint_deleted_while_it_is_read_is_gone_not_an_error(ckpts, tmp_path, calls,
                                                                    monkeypatch):
    import shutil

    run = tmp_path / "run"
    for step in (10, 20):
        add_checkpoint(run, step)
    analyze = da.analyze

    def rotating(base, tuned, **kwargs):  # the trainer rotates checkpoint-10 away meanwhile
        if Path(tuned).name == "checkpoint-10":
            shutil.rmtree(run / "checkpoint-10")
        return analyze(base, tuned, **kwargs)

    monkeypatch.setattr(da, "analyze", rotating)
    at = follow(run, str(ckpts["base"]))
    assert not at.error and steps(at) == [20]
    assert ("checkpoint-10: deleted while being read (rotated away by the trainer's "
            "save_total_limit?); no rows for it.") in [c.value for c in at.caption]
