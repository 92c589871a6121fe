"""The results cache from the command line: on by default, --cache DIR, --no-cache,
--clear-cache; a folder that cannot hold it is one note and a run without it."""

from __future__ import annotations

import os

import pytest

from dora_analysis.cache.store import FILE_NAME
from dora_analysis.cli import main


def args(ckpts, tmp_path, *extra):
    return [str(ckpts["base"]), str(ckpts["tuned"]), "-o", str(tmp_path / "t.csv"), *extra]


def test_on_by_default_and_a_second_run_says_what_it_read(ckpts, tmp_path, capsys):
    default = os.path.join(os.environ["XDG_CACHE_HOME"], "dora-analysis")
    assert main(args(ckpts, tmp_path)) == 0
    first = (tmp_path / "t.csv").read_bytes()
    assert os.path.isfile(os.path.join(default, FILE_NAME))
    capsys.readouterr()
    assert main(args(ckpts, tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"note: results cache {default}: 23 of 23 matrix pairs read from it, 0 computed" in err
    assert (tmp_path / "t.csv").read_bytes() == first
    assert main(args(ckpts, tmp_path, "-q")) == 0
    assert capsys.readouterr().err == ""  # quiet


def test_no_cache_and_another_folder(ckpts, tmp_path, capsys):
    assert main(args(ckpts, tmp_path, "--no-cache")) == 0
    assert not os.path.exists(os.environ["XDG_CACHE_HOME"] + "/dora-analysis")
    assert main(args(ckpts, tmp_path, "--cache", str(tmp_path / "c"))) == 0
    assert (tmp_path / "c" / FILE_NAME).is_file()
    with pytest.raises(SystemExit) as exc:
        main(args(ckpts, tmp_path, "--cache", "x", "--no-cache"))
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_folder_that_cannot_hold_it_is_one_note(ckpts, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(args(ckpts, tmp_path, "--cache", str(tmp_path / "file" / "c"))) == 0
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if line.startswith("note: results cache")]
    assert len(notes) == 1 and "cannot be used" in notes[0] and "running without it" in notes[0]
    assert (tmp_path / "t.csv").is_file()


def test_clear_cache(ckpts, tmp_path, capsys):
    cache = tmp_path / "c"
    assert main(args(ckpts, tmp_path, "--cache", str(cache))) == 0
    capsys.readouterr()
    assert main(["--clear-cache", "--cache", str(cache)]) == 0  # alone: only that
    assert capsys.readouterr().err.startswith(f"cleared the results cache {cache}: 23 entries")
    assert main(args(ckpts, tmp_path, "--cache", str(cache), "--clear-cache")) == 0
    err = capsys.readouterr().err  # cleared first (nothing there), then analysed afresh
    assert f"cleared the results cache {cache}: 0 entries" in err and "read from it" not in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / FILE_NAME).write_bytes(os.urandom(8192))
    assert main(["--clear-cache", "--cache", str(tmp_path / "junk")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'junk'}: cannot clear the "
                                               "results cache"), err
