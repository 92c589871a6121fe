"""All-or-nothing outputs: every temp first, then every rename, undone on failure or signal."""

from __future__ import annotations

import errno
import os
import signal
import stat

import pytest

from dora_analysis import atomic
from dora_analysis.atomic import write_all
from dora_analysis.errors import OutputError


def writer(text: str):
    return lambda tmp: tmp.write_text(text)


@pytest.fixture
def old(tmp_path):
    """Two outputs from an earlier run, and the folder's listing."""
    (tmp_path / "a.csv").write_text("old a")
    (tmp_path / "b.csv").write_text("old b")
    return tmp_path


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_all_written(old):
    paths = write_all([(old / "a.csv", writer("new a")), (old / "c.csv", writer("new c"))])
    assert [p.name for p in paths] == ["a.csv", "c.csv"]
    assert (old / "a.csv").read_text() == "new a" and (old / "c.csv").read_text() == "new c"
    assert listing(old) == ["a.csv", "b.csv", "c.csv"]  # no temporary or backup file left


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     KeyboardInterrupt(), RuntimeError("a bug")])
def test_a_failing_writer_leaves_nothing(old, failure):
    def half_then_fail(tmp):
        tmp.write_text("half")
        raise failure

    jobs = [(old / "a.csv", writer("new a")), (old / "c.csv", writer("new c")),
            (old / "b.csv", half_then_fail)]
    with pytest.raises(OutputError if isinstance(failure, OSError) else type(failure)) as exc:
        write_all(jobs)
    if isinstance(failure, OSError):
        assert str(exc.value) == (f"{old / 'b.csv'}: cannot write (No space left on device); no "
                                  "output was written")
    assert listing(old) == ["a.csv", "b.csv"]
    assert (old / "a.csv").read_text() == "old a" and (old / "b.csv").read_text() == "old b"


def test_a_failing_rename_puts_every_old_file_back(old, monkeypatch):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the third output's rename fails
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OutputError, match=r"c\.csv: cannot put in place \(Input/output error\); "
                                          "no output was changed"):
        write_all([(old / "a.csv", writer("new a")), (old / "new.csv", writer("new")),
                   (old / "c.csv", writer("new c"))])
    assert listing(old) == ["a.csv", "b.csv"]  # new.csv removed again, no temps, no backups
    assert (old / "a.csv").read_text() == "old a"


def test_a_signal_during_the_renames_is_held_then_undoes_them(old, monkeypatch):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between two renames
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_all([(old / "a.csv", writer("new a")), (old / "b.csv", writer("new b"))])
    assert len(calls) == 4  # both renames ran (the signal was held), then both were undone
    assert listing(old) == ["a.csv", "b.csv"]
    assert (old / "a.csv").read_text() == "old a" and (old / "b.csv").read_text() == "old b"


def test_files_get_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        (path,) = write_all([(tmp_path / "t.csv", writer("x"))])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600


def test_temporary_names_are_short(tmp_path):
    name = "n" * (255 - len(".csv")) + ".csv"  # the longest name ext4 allows
    seen = []
    (path,) = write_all([(tmp_path / name, lambda tmp: (seen.append(tmp.name),
                                                        tmp.write_text("x")))])
    assert path.read_text() == "x" and len(seen[0]) < 24 and seen[0].startswith(".dora-")
