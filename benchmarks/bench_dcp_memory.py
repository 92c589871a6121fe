"""Memory of reading a DCP checkpoint one tensor (or row block) at a time, against loading it whole.

    python benchmarks/bench_dcp_memory.py --out bench-output/dcp

writes (once) a LLaMA-shaped fp32 DCP folder of ~430 MiB with ``torch.distributed.checkpoint.save``
(``{"model": sd}``, as accelerate does), then measures, each in a fresh child process with the
files in the page cache:

* ``whole``   — ``torch.distributed.checkpoint.load`` of the full state dict (the baseline);
* ``tensor``  — ``DcpCheckpoint.get_tensor`` of each tensor in turn (mmap backend);
* ``rows``    — ``get_rows`` in blocks of 4 Mi elements, as ``analyze`` reads (mmap);
* ``pread``   — the same row blocks read with ``pread`` into private buffers.

Printed: peak RSS and peak private (anonymous) memory above the child's baseline after imports,
against the largest tensor and against ``whole``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

from bench_analyze import PeakAnon

HIDDEN, INTER, LAYERS, VOCAB = 1024, 2816, 6, 16000
BLOCK = 1 << 22


def write(folder: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                   p + "self_attn.k_proj.weight": (HIDDEN // 4, HIDDEN),
                   p + "self_attn.v_proj.weight": (HIDDEN // 4, HIDDEN),
                   p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                   p + "mlp.up_proj.weight": (INTER, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, INTER)}
    state = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=folder)


def run(mode: str, folder: Path) -> dict:
    import torch

    from dora_analysis.io.dcp import DcpCheckpoint

    total = 0.0
    if mode == "whole":
        import torch.distributed.checkpoint as dcp

        from dora_analysis.io.dcp import _safe_reader

        with DcpCheckpoint(folder) as src:
            state = {k: torch.empty(src.info(k).shape, dtype=src.info(k).dtype)
                     for k in src.keys()}
        dcp.load(state, storage_reader=_safe_reader(folder), no_dist=True)
        total = sum(float(t.double().square().sum()) for t in state.values())
    else:
        with DcpCheckpoint(folder, "pread" if mode == "pread" else "mmap") as src:
            for name in src.keys():
                if mode == "tensor":
                    total += float(src.get_tensor(name).double().square().sum())
                    continue
                rows, cols = src.info(name).matrix_shape
                step = max(1, BLOCK // cols)
                for start in range(0, rows, step):
                    total += float(src.get_rows(name, start, start + step).double().square().sum())
    return {"check": total}


def child(mode: str, folder: Path) -> None:
    import torch  # noqa: F401 - imports count in the baseline, not in the measurement

    import dora_analysis.io.dcp  # noqa: F401

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with PeakAnon() as anon:
        start_anon = anon._read() / 1024
        start = time.perf_counter()
        result = run(mode, folder)
        wall = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result | {"wall_s": wall, "rss_mib": peak_rss - base_rss,
                               "anon_mib": anon.peak_kib / 1024 - start_anon}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-output/dcp"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    folder = args.out / "model"
    if not (folder / ".metadata").is_file():
        write(folder)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    largest = max(VOCAB * HIDDEN, INTER * HIDDEN) * 4 / 2**20
    results = {}
    for mode in ("whole", "whole", "tensor", "rows", "pread"):  # the first warms the cache
        proc = subprocess.run([sys.executable, __file__, "--child", mode, str(folder)],
                              capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    checks = [r["check"] for r in results.values()]
    assert max(checks) - min(checks) <= 1e-9 * max(checks), f"modes read different data: {checks}"
    print(f"DCP {folder}: {size:.0f} MiB on disk, largest tensor {largest:.1f} MiB; "
          "memory above the post-import baseline, warm page cache")
    print(f"{'mode':<8}{'wall s':>8}{'peak RSS MiB':>14}{'private MiB':>13}"
          f"{'RSS / largest':>15}{'RSS / whole':>13}")
    whole = results["whole"]["rss_mib"]
    for mode, r in results.items():
        print(f"{mode:<8}{r['wall_s']:>8.2f}{r['rss_mib']:>14.0f}{r['anon_mib']:>13.0f}"
              f"{r['rss_mib'] / largest:>15.2f}{r['rss_mib'] / whole:>13.2f}")


if __name__ == "__main__":
    main()
