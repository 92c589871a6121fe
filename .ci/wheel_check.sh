#!/usr/bin/env bash
# Installable the way users install: builds the wheel and the sdist (python -m build), installs the
# wheel with [app] into a fresh venv OUTSIDE the repository (CPU torch first, pinned, as the
# Makefile does), and there runs dora-analyze on two tiny safetensors files it writes,
# dora-train --help, and dora-dashboard (HTTP 200 on its port, its pages loaded from the installed
# package), then stops it. Prints the time it took.
#   PYTHON: the interpreter that builds (default python3; it needs `build`, from the [test] extra)
#   TORCH:  the torch requirement installed first (default torch==2.13.0)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
case "$PYTHON" in  # a relative path (make's .venv/bin/python) must survive the cd below
    */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;;
esac
TORCH="${TORCH:-torch==2.13.0}"
started=$(date +%s)
work="$(mktemp -d "${TMPDIR:-/tmp}/dora-wheel-check.XXXXXX")"
server=""
cleanup() {
    if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
        kill "$server"; wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
step() { echo "wheel check: $*"; }

step "building the sdist and the wheel (the wheel is built from the sdist)"
"$PYTHON" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log"; exit 1; }
wheels=("$work"/dist/*.whl); sdists=("$work"/dist/*.tar.gz)
[ "${#wheels[@]}" = 1 ] && [ -f "${wheels[0]}" ] && [ "${#sdists[@]}" = 1 ] && [ -f "${sdists[0]}" ] \
    || { echo "error: expected one wheel and one sdist in $work/dist"; ls -l "$work/dist"; exit 1; }
"$PYTHON" - "${wheels[0]}" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
needed = {"dora_analysis/app/streamlit_app.py", "dora_analysis/app/serve.py",
          "dora_analysis/app/views/data.py", "dora_analysis/app/views/live.py"}
missing = sorted(needed - names)
if missing:
    sys.exit(f"error: the wheel lacks {', '.join(missing)}")
if any(n.startswith(("tests/", "app/", "docs/")) for n in names):
    sys.exit("error: the wheel ships files outside the package")
EOF

step "a fresh venv outside the repository: $TORCH, then the wheel with [app]"
cd "$work"
unset PYTHONPATH  # nothing of the checkout may be imported
"$PYTHON" -m venv venv  # from the base interpreter, not the caller's venv
venv/bin/pip install "$TORCH" >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
venv/bin/pip install "${wheels[0]}[app]" >>"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
venv/bin/python - "$repo" <<'EOF'
import os, sys
import dora_analysis
here = os.path.realpath(dora_analysis.__file__)
if here.startswith(os.path.realpath(sys.argv[1]) + os.sep):
    sys.exit(f"error: dora_analysis was imported from the checkout ({here}), not the wheel")
EOF

step "dora-analyze on two tiny safetensors files"
venv/bin/python - <<'EOF'
import torch
from safetensors.torch import save_file
torch.manual_seed(0)
base = {f"model.layers.{i}.self_attn.{m}_proj.weight": torch.randn(24, 16)
        for i in range(2) for m in "qv"}
save_file(base, "base.safetensors")
save_file({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}, "tuned.safetensors")
EOF
venv/bin/dora-analyze -q base.safetensors tuned.safetensors -o table.csv
venv/bin/python - <<'EOF'
import csv
with open("table.csv", newline="") as f:
    rows = list(csv.DictReader(f))
assert len(rows) == 4 and all(float(r["delta_m"]) > 0 for r in rows), rows
EOF

step "dora-train --help"
venv/bin/dora-train --help >/dev/null

step "dora-dashboard answers on its port"
port="$(venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
venv/bin/dora-dashboard --headless --port "$port" --table table.csv >"$work/dashboard.log" 2>&1 &
server=$!
venv/bin/python - "$port" <<'EOF' || { cat "$work/dashboard.log"; exit 1; }
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.time() + 120
while True:
    try:
        with urllib.request.urlopen(url + "/", timeout=5) as page, \
                urllib.request.urlopen(url + "/_stcore/health", timeout=5) as health:
            if page.status == 200 and health.read().strip() == b"ok":
                print(f"wheel check: {url} answers 200")
                break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit(f"error: the dashboard did not answer on {url} within 120 s")
    time.sleep(0.5)
EOF
# The pages themselves, run from the installed package (a served page loads them per session).
venv/bin/python - <<'EOF'
from pathlib import Path
from streamlit.testing.v1 import AppTest
import dora_analysis.app
app = AppTest.from_file(str(Path(dora_analysis.app.__file__).with_name("streamlit_app.py")),
                        default_timeout=120).run()
assert not app.exception, app.exception
EOF
kill "$server"; wait "$server" 2>/dev/null || true; server=""
step "passed in $(( $(date +%s) - started )) s"
