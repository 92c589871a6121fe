"""Both command lines: usage errors are one line (exit 2); Ctrl-C and SIGTERM at any moment, also
while modules import, end with one line, exit 130/143 and nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dora_analysis.cli import main as analyze_main
from dora_analysis.exits import printable
from tests.test_cli import digest

# The console script pip writes, plus one byte on a pipe just before it imports anything of
# ours, so that the delays below count from there and not from the interpreter's own start-up.
# (A signal in the few milliseconds of that import itself, before our code runs, gets Python's
# own traceback: see dora_analysis/console.py.)
ENTRY = ("import os, sys\nos.write(int(sys.argv.pop(1)), b'!')\n"
         "from dora_analysis.console import analyze\nsys.exit(analyze())")


def train_main(argv):
    from dora_analysis.training.cli import main

    return main(argv)


@pytest.mark.parametrize("main, argv, message", [
    (analyze_main, ["only-one-arg"], "the following arguments are required: TUNED"),
    (analyze_main, ["a", "b", "--axis", "sideways"], "argument --axis: invalid choice"),
    (analyze_main, ["a", "b", "--bogus"], "unrecognized arguments: --bogus"),
    (train_main, ["--bogus"], ""),  # its options are being reworked: any usage error
])
def test_usage_errors_are_one_error_line(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), err
    assert err.rstrip().endswith("--help)")


def test_printable_escapes_bytes_that_are_not_utf8():
    assert printable(os.fsdecode(b"run\xff/x")) == "run\\xff/x"
    assert printable("ΔM") == "ΔM"


def interrupt(ckpts, tmp_path, delay: float, signum=signal.SIGINT):
    """Run dora-analyze with three outputs; send ``signum`` ``delay`` s after our code starts."""
    out = tmp_path / f"out-{delay}"
    out.mkdir()
    argv = [str(ckpts["base"]), str(ckpts["series"]), str(ckpts["tuned"]), "-o",
            str(out / "t.csv"), "--summary", str(out / "s.parquet"), "--html", str(out / "r.html")]
    read, write = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", ENTRY, str(write), *argv],
                                pass_fds=(write,), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert os.read(read, 1) == b"!"
    os.close(read)
    time.sleep(delay)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr, sorted(p.name for p in out.iterdir())


def check_interrupted(rc, stderr, files, signum=signal.SIGINT):
    if rc == 0:  # the run was over before the signal: then every output is there
        assert files == ["r.html", "s.parquet", "t.csv"], stderr
        return
    expected = "error: interrupted" if signum == signal.SIGINT else "error: terminated (SIGTERM)"
    assert (rc, stderr) == (128 + signum, expected + "\n")
    assert files == []  # no output, no temporary file


@pytest.mark.parametrize("delay", [0.05, 0.6, 1.5])  # our imports, torch's import, the run
def test_ctrl_c_at_any_moment(ckpts, tmp_path, delay):
    before = digest([ckpts["root"]])
    check_interrupted(*interrupt(ckpts, tmp_path, delay))
    assert digest([ckpts["root"]]) == before  # inputs untouched


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0, 1.2, 2.0, 2.5, 3.0, 4.0,
                                   5.0, 6.0])
def test_ctrl_c_at_many_moments(ckpts, tmp_path, delay):
    check_interrupted(*interrupt(ckpts, tmp_path, delay))


def test_sigterm_removes_temporary_files_too(ckpts, tmp_path):
    check_interrupted(*interrupt(ckpts, tmp_path, 1.0, signal.SIGTERM), signum=signal.SIGTERM)


QUICK = ("import atexit, pathlib, sys\n"
         "atexit.register(pathlib.Path(sys.argv.pop(1)).write_text, 'ran')\n"
         "from dora_analysis.console import analyze\nsys.exit(analyze())")


def run_entry(argv, marker, **kwargs):
    return subprocess.run([sys.executable, "-c", QUICK, str(marker), *argv], text=True,
                          capture_output=True, timeout=120, **kwargs)


WRAPPED = """
import signal, sys
from dora_analysis.exits import Terminated, run

def main():
    try:
        raise Terminated(signal.SIGTERM)
    except Terminated as exc:
        raise RuntimeError("Error calling __set_name__") from exc

def broken():
    raise RuntimeError("a real error")

sys.exit(run(lambda: {main}))
"""


def test_a_signal_wrapped_by_python_in_another_error_is_still_an_interrupt():
    # CI saw it: SIGTERM landed in a class body during plotly's import, and Python re-raised it
    # as "RuntimeError: Error calling __set_name__" — a traceback instead of one line.
    # (In a subprocess: run() leaves the signals ignored, which children would inherit.)
    done = subprocess.run([sys.executable, "-c", WRAPPED.replace("{main}", "main")],
                          text=True, capture_output=True, timeout=60)
    assert (done.returncode, done.stderr) == (143, "error: terminated (SIGTERM)\n")
    broken = subprocess.run([sys.executable, "-c", WRAPPED.replace("{main}", "broken")],
                            text=True, capture_output=True, timeout=60)
    assert broken.returncode == 1 and "RuntimeError: a real error" in broken.stderr


def test_an_ignored_signal_stays_ignored():
    """``nohup`` ignores SIGHUP: the run must not turn it back into an interrupt."""
    script = ("import os, signal, sys\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
              "from dora_analysis.exits import run\n"
              "def main():\n    os.kill(os.getpid(), signal.SIGHUP)\n    return 0\n"
              "sys.exit(run(lambda: main))")
    done = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


SWALLOWED = """
import os, signal, sys
from dora_analysis.exits import raise_if_signalled, run

def main():
    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIG{name})
            for _ in range(100000):  # the handler runs in here: Python prints and ignores it
                pass
    Finalized()
    for _ in range(100000):
        raise_if_signalled()  # as the training loop does at every step
    return 0

sys.exit(run(lambda: main))
"""


@pytest.mark.parametrize("name, code, line", [("INT", 130, "error: interrupted"),
                                              ("TERM", 143, "error: terminated (SIGTERM)")])
def test_a_signal_swallowed_by_a_finalizer_still_stops_the_loop(name, code, line):
    # a dora-train run in CI went on training after SIGINT: the interrupt, raised while a
    # finalizer ran, was printed as "Exception ignored" and lost
    done = subprocess.run([sys.executable, "-c", SWALLOWED.replace("{name}", name)],
                          text=True, capture_output=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert "Exception ignored" in done.stderr and done.stderr.splitlines()[-1] == line


def test_the_quick_exit_keeps_outputs_output_and_exit_handlers(ckpts, tmp_path):
    argv = [str(ckpts["base"]), str(ckpts["tuned"]), "-o", str(tmp_path / "t.csv"),
            "--summary", str(tmp_path / "s.csv")]
    done = run_entry(argv, tmp_path / "marker")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "marker").read_text() == "ran"  # atexit handlers still run
    assert (tmp_path / "t.csv").stat().st_size and (tmp_path / "s.csv").stat().st_size
    in_process = subprocess.run([sys.executable, "-m", "dora_analysis.cli", *argv[:2]],
                                text=True, capture_output=True, timeout=120)
    assert done.stdout.endswith(in_process.stdout) and in_process.stdout  # printed to the end

    failed = run_entry([str(ckpts["base"]), str(tmp_path / "missing.safetensors")],
                       tmp_path / "marker2")
    assert failed.returncode == 2 and len(failed.stderr.splitlines()) == 1, failed.stderr
    assert (tmp_path / "marker2").read_text() == "ran"


def test_a_reader_that_leaves_early_is_not_an_error(ckpts, tmp_path):
    # `dora-analyze … | head -0`: the reader is gone before anything is printed, so printing
    # the summary meets a closed pipe; exit 0, no traceback, exit handlers still run
    proc = subprocess.Popen([sys.executable, "-c", QUICK, str(tmp_path / "marker"),
                             str(ckpts["base"]), str(ckpts["series"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in stderr, stderr
    assert (tmp_path / "marker").read_text() == "ran"


# -- dora-train: a real process, a real signal, while it trains ---------------------------------
TRAIN_ENTRY = "import sys\nfrom dora_analysis.console import train\nsys.exit(train())"


def signal_training(tiny_llama, tmp_path, signum, entry=("-c", TRAIN_ENTRY)):
    """Start dora-train (causal LM, a checkpoint at every step, endless steps); once
    checkpoint-1 is saved, send ``signum``; return exit code, stderr and the run folder."""
    import json

    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"what is {i}?", "response": f"{i}."})
                              for i in range(8)))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, *entry, "--task", "causal-lm", "--model", str(tiny_llama),
         "--data", str(data), "--method", "lora", "--steps", "100000",
         "--save-steps", ",".join(map(str, range(1, 200))), "--batch-size", "2", "--device",
         "cpu", "--output", str(out), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-1").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr, out


@pytest.mark.parametrize("signum, message", [
    (signal.SIGTERM, "error: terminated (SIGTERM); the last saved checkpoint can be resumed"),
    (signal.SIGINT, "error: interrupted; the last saved checkpoint can be resumed"),
])
def test_dora_train_signals_end_with_one_line_and_the_signals_exit_code(tiny_llama, tmp_path,
                                                                        signum, message):
    rc, stderr, out = signal_training(tiny_llama, tmp_path, signum)
    assert rc == 128 + signum, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith(message), stderr
    assert not list(out.glob(".*.tmp"))  # a save cut short leaves nothing behind


@pytest.mark.slow
def test_dora_train_under_python_m_handles_sigterm_too(tiny_llama, tmp_path):
    """``torchrun -m dora_analysis.training.cli`` sends SIGTERM to its workers on failure."""
    rc, stderr, _ = signal_training(tiny_llama, tmp_path, signal.SIGTERM,
                                    entry=("-m", "dora_analysis.training.cli"))
    assert rc == 143 and "error: terminated (SIGTERM)" in stderr, stderr
