"""Bytes a remote analysis reads, against the bytes of the tensors it selects.

Serves a LLaMA-shaped pair (base + tuned, float32, non-square) from a loopback HTTP server with
Range support and counts the body bytes sent, for several --modules selections.

    .venv/bin/python benchmarks/bench_remote.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1]))
import dora_analysis as da  # noqa: E402
from tests.common import perturb  # noqa: E402
from tests.io.test_remote import big_state  # noqa: E402
from tests.servers import FileServer  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = big_state(0)
        save_file(base, str(root / "base.safetensors"))
        save_file(perturb(base, 0.02, seed=1), str(root / "tuned.safetensors"))
        file_bytes = 2 * (root / "base.safetensors").stat().st_size
        print(f"two files: {file_bytes / 2**20:.2f} MiB")
        print("modules       selected MiB   sent MiB   ratio   GET requests")
        for modules in (("q", "v"), ("k",), ("down",), None):
            selected = 2 * sum(
                t.numel() * t.element_size() for n, t in base.items() if t.dim() == 2
                and (modules is None or da.io.keys.module_kind(n) in modules))
            with FileServer(root) as srv:
                da.analyze(f"{srv.url}/base.safetensors", f"{srv.url}/tuned.safetensors",
                           modules=modules)
                gets = sum(1 for r in srv.requests if r[0] == "GET")
                label = ",".join(modules) if modules else "all"
                print(f"{label:12s} {selected / 2**20:12.2f} {srv.sent / 2**20:10.2f} "
                      f"{srv.sent / selected:7.3f} {gets:8d}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
