"""Executors: every core, pieces of large pairs, a shared memory budget; the serial table."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.analysis import plan, run_job, to_frame
from dora_analysis.config import AnalysisConfig
from dora_analysis.errors import CheckpointFormatError, ConfigError
from dora_analysis.executors import MemoryBudget, plan_units, run_local, splittable
from dora_analysis.io.open import open_checkpoint
from dora_analysis.metrics.base import Metric
from dora_analysis.pairs import PIECE_BLOCKS, pieces
from tests.common import WIDE_BLOCK, perturb, wide_state


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    base = wide_state(0)
    save_file(base, str(root / "base.safetensors"))
    for i in (1, 2):
        (root / "run" / f"checkpoint-{i}").mkdir(parents=True)
        save_file(perturb(base, 0.01 * i, seed=i),
                  str(root / "run" / f"checkpoint-{i}" / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def peft_dora(tmp_path_factory):
    from tests.peft_models import CASES, make_case

    fn, kwargs = CASES["gpt2_dora"]  # Conv1D, DoRA magnitude on the stored columns
    return make_case(tmp_path_factory.mktemp("peft"), "gpt2_dora", fn, kwargs)


def job_by_job(work) -> pd.DataFrame:
    """The table as the plain per-job loop computes it (no executor): the reference."""
    records = []
    options = work.config.read_options
    with open_checkpoint(work.base, options) as base:
        for job in work.jobs:
            with open_checkpoint(job.checkpoint.path, options, base=base) as tuned:
                records += run_job(job, base, tuned, work.config)
    return to_frame(records, work.config)


def assert_same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # bit for bit, row for row


CASES = {
    "pair, both axes": lambda p: (p["base"], [p["tuned"]], {"axis": "both"}),
    "series and shards": lambda p: (p["base"], [p["series"], p["sharded"]], {}),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_threads_give_the_serial_table_bit_for_bit(ckpts, case, workers):
    base, tuned, settings = CASES[case](ckpts)
    config = AnalysisConfig(workers=workers, block_elements=64, **settings)
    work = plan(base, tuned, config=config)
    assert_same_table(da.analyze(base, tuned, config=config), job_by_job(work))


@pytest.mark.parametrize("workers", [1, 3])
def test_pieces_of_large_pairs_give_the_serial_table(wide, workers):
    config = AnalysisConfig(workers=workers, block_elements=WIDE_BLOCK, axis="both")
    work = plan(wide / "base.safetensors", [wide / "run"], config=config)
    units = plan_units(work)
    split = [u for u in units if u.rows is not None]
    assert {u.pair_of(work).name for u in split} == {"model.embed_tokens.weight",
                                                     "model.layers.0.mlp.down_proj.weight"}
    pieces_of = [-(-rows // PIECE_BLOCKS) for rows in (300, 260)]  # one row per block
    assert len(split) == 2 * sum(pieces_of) and min(pieces_of) >= 3  # two checkpoints
    table = da.analyze(wide / "base.safetensors", wide / "run", config=config)
    assert_same_table(table, job_by_job(work))


def test_pieces_agree_with_the_maths_on_loaded_tensors(wide):
    table = da.analyze(wide / "base.safetensors", wide / "run" / "checkpoint-1", axis="both",
                       block_elements=WIDE_BLOCK)
    base = wide_state(0)
    tuned = perturb(base, 0.01, seed=1)
    embed = "model.embed_tokens.weight"
    for axis in ("out", "in"):
        row = table[(table[C.NAME] == embed) & (table[C.AXIS] == axis)].iloc[0]
        whole = da.compare(base[embed], tuned[embed], axis=axis, transposed=True)
        assert row[C.DELTA_D] == pytest.approx(whole.delta_d, rel=1e-12)
        assert row[C.DELTA_M] == pytest.approx(whole.delta_m, rel=1e-12)


def test_pieces_cover_the_rows_in_whole_blocks(wide):
    work = plan(wide / "base.safetensors", [wide / "run" / "checkpoint-1"],
                config=AnalysisConfig(block_elements=40))
    for pair in work.jobs[0].pairs:
        rows, cols = pair.matrix_shape
        ranges = pieces(pair, 40)
        step = max(1, 40 // cols)
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all((stop - start) == step * PIECE_BLOCKS for start, stop in ranges[:-1])


def test_adapters_and_dense_metrics_keep_pairs_whole(peft_dora, wide, monkeypatch):
    work = plan(peft_dora.base, [peft_dora.adapter], config=AnalysisConfig(block_elements=1))
    assert work.jobs[0].adapter and not splittable(work.jobs[0], work.config)
    wide_work = plan(wide / "base.safetensors", [wide / "run" / "checkpoint-1"],
                     config=AnalysisConfig(block_elements=WIDE_BLOCK))
    assert splittable(wide_work.jobs[0], wide_work.config)
    dense = Metric("dense_probe", "", (), lambda view: {}, cost="dense")
    monkeypatch.setattr("dora_analysis.executors.registry.enabled", lambda config: [dense])
    assert all(u.rows is None for u in plan_units(wide_work))


@pytest.mark.parametrize("closed_form", [True, False])
def test_adapters_on_threads_give_the_serial_table(peft_dora, closed_form):
    config = AnalysisConfig(workers=3, block_elements=16, axis="both", closed_form=closed_form)
    work = plan(peft_dora.base, [peft_dora.adapter], config=config)
    assert_same_table(da.analyze(peft_dora.base, peft_dora.adapter, config=config),
                      job_by_job(work))


def test_an_error_in_a_worker_reaches_the_caller(ckpts, tmp_path):
    tuned = tmp_path / "tuned.safetensors"
    tuned.write_bytes(ckpts["tuned"].read_bytes())
    work = plan(ckpts["base"], [tuned], config=AnalysisConfig(workers=2))
    tuned.write_bytes(tuned.read_bytes()[:-100])  # the file changes between plan and run
    with pytest.raises(CheckpointFormatError, match="tuned.safetensors"):
        run_local(work, workers=2)


def test_torch_threads_are_restored(ckpts):
    before = torch.get_num_threads()
    da.analyze(ckpts["base"], ckpts["tuned"], workers=2)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_workers_must_be_a_positive_whole_number(bad):
    with pytest.raises(ConfigError, match="--workers"):
        AnalysisConfig(workers=bad)


class TestMemoryBudget:
    def test_units_that_do_not_fit_together_wait(self):
        budget, inside, peak = MemoryBudget(100), [0], [0]
        lock = threading.Lock()

        def hold(n: int) -> None:
            with budget.hold(n):
                with lock:
                    inside[0] += n
                    peak[0] = max(peak[0], inside[0])
                time.sleep(0.02)
                with lock:
                    inside[0] -= n

        threads = [threading.Thread(target=hold, args=(60,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert peak[0] == 60

    def test_a_unit_larger_than_the_budget_runs_alone(self):
        budget = MemoryBudget(100)
        with budget.hold(500):  # would wait forever if it had to fit
            pass
        with budget.hold(0), budget.hold(100):  # streaming units hold nothing
            pass


def test_sources_that_are_not_thread_safe_are_read_one_at_a_time(ckpts, monkeypatch):
    from dora_analysis.io.safetensors import SafetensorsFile

    inside, most, names = [0], [0], []
    lock = threading.Lock()
    read = SafetensorsFile.read_rows

    def one_reader(self, *args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            names.append((self.path.name, args[0], args[1]))
        try:
            time.sleep(0.001)  # long enough for another thread to come in, if it may
            return read(self, *args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(SafetensorsFile, "read_rows", one_reader)
    base, tuned = ckpts["base"], [ckpts["tuned"], ckpts["sharded"]]
    serial = da.analyze(base, tuned, workers=1, block_elements=256)
    serial_reads, names[:] = list(names), []
    monkeypatch.setattr(SafetensorsFile, "thread_safe", False)
    assert_same_table(da.analyze(base, tuned, workers=4, block_elements=256), serial)
    assert most[0] == 1 and names == serial_reads  # one at a time, in the serial order
    monkeypatch.setattr(SafetensorsFile, "thread_safe", True)  # and the check can see overlap
    assert_same_table(da.analyze(base, tuned, workers=4, block_elements=256), serial)
    assert most[0] > 1


def test_a_failure_releases_the_units_waiting_for_their_turn(ckpts, tmp_path, monkeypatch):
    from dora_analysis.io.safetensors import SafetensorsFile

    monkeypatch.setattr(SafetensorsFile, "thread_safe", False)
    tuned = tmp_path / "tuned.safetensors"
    tuned.write_bytes(ckpts["tuned"].read_bytes())
    work = plan(ckpts["base"], [ckpts["series"], tuned], config=AnalysisConfig(workers=4))
    tuned.write_bytes(tuned.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match="tuned.safetensors"):  # and no hang
        run_local(work, workers=4)


@pytest.mark.parametrize("workers", [1, 3])
def test_meanwhile_runs_once_in_the_calling_thread_while_units_remain(ckpts, workers):
    """What the caller needs next is imported while the workers compute: once, in its thread,
    after the first unit (the kernel is loaded by then), and the table does not change."""
    work = plan(ckpts["base"], [ckpts["series"]], config=AnalysisConfig(workers=workers))
    units, seen = plan_units(work), []
    done_before: list[int] = []
    progress = []

    def meanwhile() -> None:
        seen.append(threading.current_thread())
        done_before.append(len(progress))

    table = to_frame(run_local(work, workers, progress=progress.append, meanwhile=meanwhile),
                     work.config)
    assert seen == [threading.current_thread()] and done_before == [1] < [len(units)]
    assert_same_table(table, job_by_job(work))


RUN_IN_A_FRESH_PROCESS = """
import hashlib, sys
import dora_analysis as da
table = da.analyze(sys.argv[1], [sys.argv[2], sys.argv[3]], axis="both",
                   workers=int(sys.argv[4]))
print(hashlib.sha256(table.to_csv(float_format="%.17g").encode()).hexdigest())
"""


def test_fresh_processes_give_the_same_bits_whatever_the_workers(ckpts):
    """Determinism across runs: fresh interpreters (the kernel loaded from its cache, numba's
    own thread count varied too) print the same table, digit for digit, as this process."""
    root = str(Path(__file__).resolve().parents[1])
    args = [str(ckpts["base"]), str(ckpts["series"]), str(ckpts["sharded"])]
    digests = set()
    for workers, numba_threads in ((1, "1"), (2, "2"), (5, "1")):
        proc = subprocess.run(
            [sys.executable, "-c", RUN_IN_A_FRESH_PROCESS, *args, str(workers)],
            capture_output=True, text=True, timeout=300,
            env=os.environ | {"PYTHONPATH": root, "NUMBA_NUM_THREADS": numba_threads})
        assert proc.returncode == 0, proc.stderr
        digests.add(proc.stdout.strip().splitlines()[-1])
    here = da.analyze(args[0], args[1:], axis="both", workers=3)
    assert digests == {hashlib.sha256(here.to_csv(float_format="%.17g").encode()).hexdigest()}
