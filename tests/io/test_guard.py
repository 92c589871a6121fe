"""Files that change while they are read: a lease holds writers off, identity checks catch the rest,
and nothing ever ends the process with SIGBUS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.errors import CheckpointChangedError, CheckpointFormatError, DoraAnalysisError
from dora_analysis.io import guard
from dora_analysis.io.guard import GuardedFile, path_kind, shown
from dora_analysis.io.safetensors import SafetensorsFile
from dora_analysis.io.torch_bin import TorchFile

NAME = "w.weight"
leases = pytest.mark.skipif(not hasattr(guard.fcntl, "F_SETLEASE"), reason="Linux leases")


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({NAME: torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)}, str(path))
    return path


def read_until_error(src, timeout: float = 20.0) -> Exception:
    """Read rows over and over (as the analysis does) until the reader reports a change."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            for start in range(0, 64, 8):
                src.get_rows(NAME, start, start + 8)
        except DoraAnalysisError as exc:
            return exc
        time.sleep(0.01)
    raise AssertionError("the change was never reported")


def in_thread(action) -> threading.Thread:
    # A writer blocks in open() until the reader lets go of its lease: never in the test's thread.
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


@leases
def test_mmap_reads_are_leased_and_a_writer_waits_for_the_reader(weights):
    with SafetensorsFile(weights) as src:
        assert src._source._guard.leased and src._source._map is not None
        expected = src.get_rows(NAME, 0, 64)
        writer = in_thread(lambda: open(weights, "r+b").truncate(100))
        time.sleep(0.3)
        assert weights.stat().st_size > 100  # held off while the mapping may be in use
        exc = read_until_error(src)
        writer.join(10)
    assert isinstance(exc, CheckpointChangedError)
    assert str(exc).startswith(f"{weights}: changed while being read (its size went from")
    assert expected.shape == (64, 8)


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_truncation_is_reported_by_name(weights, backend):
    with SafetensorsFile(weights, backend) as src:
        src.get_rows(NAME, 0, 8)
        writer = in_thread(lambda: open(weights, "r+b").truncate(100))
        exc = read_until_error(src)
        writer.join(10)
    assert isinstance(exc, CheckpointChangedError) and str(weights) in str(exc)


@leases
def test_opened_for_writing_but_unchanged_goes_on_with_pread(weights):
    with SafetensorsFile(weights) as src:
        expected = src.get_rows(NAME, 0, 64)
        writer = in_thread(lambda: open(weights, "r+b").close())
        deadline = time.time() + 10
        while src._source._map is not None and time.time() < deadline:
            assert torch.equal(src.get_rows(NAME, 0, 64), expected)
            time.sleep(0.01)
        writer.join(10)
        # the mapping dropped, the lease released
        assert src._source._map is None and not src._source._guard.leased
        assert torch.equal(src.get_rows(NAME, 0, 64), expected)
        assert torch.equal(src.get_tensor(NAME), expected)


def test_replaced_and_deleted_files_are_reported(weights, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({NAME: torch.zeros(64, 8)}, str(other))
    with SafetensorsFile(weights) as src:
        os.replace(other, weights)
        with pytest.raises(CheckpointChangedError, match="another file was put in its place"):
            src.get_rows(NAME, 0, 8)
    with SafetensorsFile(weights, "pread") as src:
        weights.unlink()
        with pytest.raises(CheckpointChangedError, match="it was deleted"):
            src.get_tensor(NAME)


def test_rewritten_in_place_with_the_same_size(weights):
    data = weights.read_bytes()
    with SafetensorsFile(weights, "pread") as src:
        src.get_rows(NAME, 0, 8)
        time.sleep(0.02)  # a later modification time than the open's
        with open(weights, "r+b") as f:
            f.seek(len(data) - 4)
            f.write(b"\0\0\0\0")
        with pytest.raises(CheckpointChangedError, match="rewritten in place"):
            src.get_rows(NAME, 0, 8)


def test_without_a_lease_nothing_is_mapped(weights, monkeypatch):
    monkeypatch.setattr(guard, "_take_lease", lambda fd: False)
    with SafetensorsFile(weights) as src:
        assert src._source._map is None  # read with pread, where truncation is a short read
        assert torch.equal(src.get_rows(NAME, 2, 4), src.get_tensor(NAME)[2:4])


@pytest.mark.parametrize("leased", [True, False])
def test_torch_files_are_checked_too(tmp_path, monkeypatch, leased):
    if not leased:
        monkeypatch.setattr(guard, "_take_lease", lambda fd: False)
    path = tmp_path / "pytorch_model.bin"
    torch.save({NAME: torch.ones(64, 8)}, path)
    with TorchFile(path) as src:
        assert torch.equal(src.get_rows(NAME, 0, 2), torch.ones(2, 8))
        writer = in_thread(lambda: open(path, "r+b").truncate(100))
        exc = read_until_error(src)
    writer.join(10)  # closing the reader released the lease
    assert not writer.is_alive()
    assert isinstance(exc, CheckpointChangedError) and str(path) in str(exc)


SCRIPT = """
import sys
import dora_analysis.cli as cli
config = cli.AnalysisConfig
cli.AnalysisConfig = lambda **kw: config(**kw, block_elements=256)  # many small reads: slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_a_file_truncated_under_a_running_analysis_is_an_error_not_sigbus(tmp_path, io):
    """dora-analyze in a real process (memory-mapping under a lease, or with pread): another
    process truncates the tuned file while it is analysed. One error line, exit 2, no output,
    base untouched. The analysis is paused (SIGSTOP) once it has the file open, so the
    truncation always lands mid-run, however fast the machine."""
    big = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 128) for i in range(24)}
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file(big, str(base))
    save_file({k: v + 0.01 for k, v in big.items()}, str(tuned))
    base_bytes = base.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(base), str(tuned), "-q", "-o",
                             str(tmp_path / "t.csv"), "--html", str(tmp_path / "r.html"),
                             "--io", io, "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and str(tuned) not in _open_files(proc.pid):
        time.sleep(0.001)  # until the analysis has the tuned file open
    os.kill(proc.pid, signal.SIGSTOP)
    # The writer waits in open() for a lease to be given up: it runs while the reader resumes.
    writer = subprocess.Popen([sys.executable, "-c",
                               f"open({str(tuned)!r}, 'r+b').truncate(4096)"])
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGCONT)
    assert writer.wait(timeout=60) == 0
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.returncode, err)  # not -7: SIGBUS
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"error: {tuned}: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "tuned.safetensors"]
    assert base.read_bytes() == base_bytes


def _open_files(pid: int) -> set[str]:
    """Paths a process has open now (descriptors may close while they are listed)."""
    found = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("make", ["fifo", "device"])
def test_special_files_are_not_regular_files(tmp_path, make):
    path = tmp_path / "w.safetensors"
    if make == "fifo":
        os.mkfifo(path)
    else:
        path = "/dev/null"
    assert path_kind(path) == "other"
    with pytest.raises(CheckpointFormatError, match="not a regular file"):
        GuardedFile(path)  # and never blocks waiting for a writer


def test_names_that_are_not_utf8_work_and_print_escaped(tmp_path):
    path = tmp_path / os.fsdecode(b"tuned\xff.safetensors")
    save_file({NAME: torch.ones(2, 2)}, str(tmp_path / "plain.safetensors"))
    os.replace(tmp_path / "plain.safetensors", path)
    with SafetensorsFile(path) as src, SafetensorsFile(path, "pread") as pread:
        assert torch.equal(src.get_tensor(NAME), pread.get_tensor(NAME))
    assert shown(path).endswith("tuned\\xff.safetensors")
    bin_path = tmp_path / os.fsdecode(b"pytorch\xfe.bin")
    torch.save({NAME: torch.ones(2, 2)}, tmp_path / "plain.bin")
    os.replace(tmp_path / "plain.bin", bin_path)
    with TorchFile(bin_path) as src:
        assert src.keys() == [NAME]
