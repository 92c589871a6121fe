"""``dora-dashboard``: serve the Streamlit dashboard, safe by default (SPEC §9).

Runs ``streamlit run`` on the packaged :file:`streamlit_app.py` with the project's server settings
given as command-line options — loopback address, upload cap, no usage statistics — so they hold
wherever the command is started, in a clone or from an installed wheel. The data-root rules are
those of :mod:`dora_analysis.app.access` (``--root`` or ``DORA_DASHBOARD_ROOT``), checked here
before the server starts. This module imports neither streamlit nor the pages: ``--help`` and a
bad option answer at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from dora_analysis.app.access import HUB_ENV, ROOT_ENV, Access
from dora_analysis.errors import DoraAnalysisError
from dora_analysis.exits import parser as one_line_errors
from dora_analysis.exits import run

APP = Path(__file__).with_name("streamlit_app.py")
TABLE_ENV = "DORA_DASHBOARD_TABLE"
HOST = "127.0.0.1"
PORT = 8501
#: Largest upload, in MB (an adapter's weights; a saved table). Larger ones are given as paths.
MAX_UPLOAD_MB = 64


def parser() -> argparse.ArgumentParser:
    p = one_line_errors(
        prog="dora-dashboard",
        description="Serve the dora-analysis dashboard (Streamlit). It listens on 127.0.0.1: "
                    "only this machine can connect, and a typed path means what it means to "
                    "dora-analyze.")
    p.add_argument("--root", help=f"data root: typed paths are read under it only, links "
                                  f"included (default: ${ROOT_ENV})")
    p.add_argument("--allow-hub", action="store_true",
                   help=f"with a data root, also read Hub ids (they download with your token; "
                        f"or {HUB_ENV}=1)")
    p.add_argument("--host", default=HOST,
                   help="address to listen on (default %(default)s). Another address serves "
                        "other machines: name a --root too, else no typed path is read")
    p.add_argument("--port", type=int, default=PORT, help="port (default %(default)s)")
    p.add_argument("--table", help=f"a table written by dora-analyze -o, opened at start-up "
                                   f"(default: ${TABLE_ENV})")
    p.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_MB,
                   help="largest upload in MB (default %(default)s); give larger files as paths")
    p.add_argument("--headless", action="store_true",
                   help="do not open a browser tab (servers, CI)")
    return p


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line for ``args`` (the script's own options after ``--``)."""
    command = [sys.executable, "-m", "streamlit", "run", str(APP),
               "--server.address", args.host, "--server.port", str(args.port),
               "--server.maxUploadSize", str(args.max_upload_mb),
               "--browser.gatherUsageStats", "false"]
    if args.headless:
        command += ["--server.headless", "true"]
    return command + ["--", *script_options(args)]


def script_options(args: argparse.Namespace) -> list[str]:
    """The options :meth:`Access.from_settings` reads in the server process."""
    return (["--root", args.root] if args.root else []) + (
        ["--allow-hub"] if args.allow_hub else [])


def check(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Refuse what the server would refuse later, before it starts (one ``error:`` line)."""
    if not 0 < args.port < 65536:
        raise DoraAnalysisError(f"--port {args.port}: give a port from 1 to 65535")
    if args.max_upload_mb <= 0:
        raise DoraAnalysisError("--max-upload-mb: give a positive number of MB")
    Access.from_settings(args.host, env, script_options(args))  # a root that is not a folder
    if args.table is not None:
        if not os.path.isfile(args.table):
            raise DoraAnalysisError(f"--table {args.table}: no such file; give a table written "
                                    "by dora-analyze -o")
        env[TABLE_ENV] = os.path.abspath(args.table)
    if importlib.util.find_spec("streamlit") is None:
        raise DoraAnalysisError("the dashboard needs streamlit: pip install 'dora-analysis[app]'")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dora-dashboard``: a bad option or a Ctrl-C is one line, as elsewhere."""
    return run(lambda: lambda: serve(argv))


def serve(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    env = dict(os.environ)
    try:
        check(args, env)
    except DoraAnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = streamlit_command(args)
    if os.name == "nt":  # no exec there: wait for the server instead
        return subprocess.call(command, env=env)
    # Become the server: a signal sent to this process (Ctrl-C, terminate) reaches it directly.
    os.execve(sys.executable, command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
