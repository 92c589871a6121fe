"""``dora-dashboard``: the command that serves the packaged dashboard (loopback by default, the
data-root rules checked before the server starts), and the library that never imports streamlit."""

from __future__ import annotations

import subprocess
import sys

import pytest

import dora_analysis
from dora_analysis.app import serve


def command(*argv: str) -> list[str]:
    return serve.streamlit_command(serve.parser().parse_args(list(argv)))


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_defaults_are_the_safe_settings():
    cmd = command()
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(serve.APP)]
    assert serve.APP.is_file() and serve.APP.parent.name == "app"
    assert option(cmd, "--server.address") == "127.0.0.1"
    assert 0 < int(option(cmd, "--server.maxUploadSize")) <= 200
    assert option(cmd, "--browser.gatherUsageStats") == "false"
    assert cmd[-1] == "--"  # no data root: nothing for the script


def test_root_and_hub_reach_the_script(tmp_path):
    cmd = command("--root", str(tmp_path), "--allow-hub", "--host", "0.0.0.0", "--port", "9999")
    assert cmd[cmd.index("--") + 1:] == ["--root", str(tmp_path), "--allow-hub"]
    assert option(cmd, "--server.address") == "0.0.0.0" and option(cmd, "--server.port") == "9999"


def run_command(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dora_analysis.app.serve", *argv],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("argv, message", [
    (["--root", "/no/such/folder"], "error: data root /no/such/folder is not a folder"),
    (["--table", "/no/such/table.csv"], "error: --table /no/such/table.csv: no such file"),
    (["--port", "0"], "error: --port 0: give a port from 1 to 65535"),
    (["--nope"], "error: unrecognized arguments: --nope (see dora-dashboard --help)"),
    (["--port", "x"], "error: argument --port: invalid int value: 'x'"),
])
def test_bad_settings_are_one_error_line_before_any_server(argv, message):
    proc = run_command(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(message), proc.stderr


def test_a_root_from_the_environment_is_checked_too(tmp_path):
    import os

    env = {**os.environ, "DORA_DASHBOARD_ROOT": str(tmp_path / "missing")}
    proc = run_command(env=env)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


LIBRARY_WITHOUT_STREAMLIT = """
import importlib, pkgutil, sys
import dora_analysis
from dora_analysis.app import serve
try:
    serve.main(["--help"])
except SystemExit:
    pass
names = [m.name for m in pkgutil.walk_packages(dora_analysis.__path__, "dora_analysis.")
         if not m.name.startswith("dora_analysis.app")]
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as exc:  # an optional extra that is not installed here
        if "streamlit" in str(exc):
            raise
print(len(names), "streamlit" in sys.modules)
"""


def test_the_library_and_the_command_s_help_never_import_streamlit():
    proc = subprocess.run([sys.executable, "-c", LIBRARY_WITHOUT_STREAMLIT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    count, imported = proc.stdout.split()[-2:]
    assert int(count) > 20 and imported == "False", proc.stdout
    assert "usage: dora-dashboard" in proc.stdout


def test_the_app_is_part_of_the_package():
    """Setuptools ships packages only: the pages need the package marker to be in the wheel."""
    app = serve.APP.parent
    assert app.parent == __import__("pathlib").Path(dora_analysis.__file__).parent
    assert (app / "views" / "__init__.py").is_file() and (app / "__init__.py").is_file()
