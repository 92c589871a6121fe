"""Time and memory of ``analyze`` against the naive notebook approach and the I/O floor.

    python benchmarks/make_llama_pair.py --size 1b --out bench-output/pair-1b
    python benchmarks/bench_analyze.py bench-output/pair-1b/base bench-output/pair-1b/tuned

Each measurement runs in a fresh child process (so peak memory is its own), best of ``--repeat``
runs, interleaved, with the files in the page cache (every method is measured warm):

* ``ours``  — ``dora_analysis.analyze(base, tuned)`` (float64, row blocks, memory-mapped reads);
* ``pread`` — the same with ``io="pread"`` (reads into private buffers instead of mapping;
  also what files get where no read lease can be taken, see ``dora_analysis/io/guard.py``);
* ``unguarded`` — ``ours`` without the guard's checks around every read (lease, size, mtime,
  inode), to measure what they cost;
* ``naive`` — load both state dicts fully, then per matrix float32 norms and
  ``1 − cosine_similarity`` (what a one-off notebook does);
* ``io``    — read every byte of both checkpoints once (the floor for any method).

Printed: wall time, peak RSS, peak private (anonymous) memory, the ratios against ``naive``, and
the accuracy of the naive float32 ΔD against ours (float64).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


class PeakAnon:
    """Samples this process's RssAnon (private memory) in a thread and keeps the peak."""

    def __init__(self, every: float = 0.005) -> None:
        self.peak_kib, self._every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self._read())
            time.sleep(self._every)

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self._read())


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def run_io(base: Path, tuned: Path) -> dict:
    buf = bytearray(64 << 20)
    total = 0
    for folder in (base, tuned):
        for file in files_of(folder):
            with open(file, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return {"bytes": total}


def run_naive(base: Path, tuned: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    sd0, sdt = {}, {}
    for file in files_of(base):
        sd0 |= load_file(str(file))
    for file in files_of(tuned):
        sdt |= load_file(str(file))
    out = {}
    for name, w0 in sd0.items():
        if w0.dim() < 2:
            continue
        a, b = w0.float(), sdt[name].float()
        dm = (b.norm(dim=1) - a.norm(dim=1)).abs().mean().item()
        dd = (1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).mean().item()
        out[name] = (dm, dd)
    return {"deltas": out}


def run_ours(base: Path, tuned: Path, **settings) -> dict:
    import dora_analysis as da

    table = da.analyze(base, tuned, **settings)
    return {"deltas": {r.name: (r.delta_m, r.delta_d) for r in table.itertuples()}}


def run_pread(base: Path, tuned: Path) -> dict:
    return run_ours(base, tuned, io="pread")


def run_unguarded(base: Path, tuned: Path) -> dict:
    from dora_analysis.io import guard

    guard.GuardedFile.check = lambda self: None
    guard.GuardedFile.lease_broken = lambda self: False
    return run_ours(base, tuned)


def run_closed(base: Path, adapter: Path) -> dict:
    return run_ours(base, adapter, closed_form=True)


def run_materialised(base: Path, adapter: Path) -> dict:
    return run_ours(base, adapter, closed_form=False)


MODES = {"io": run_io, "naive": run_naive, "ours": run_ours, "pread": run_pread,
         "unguarded": run_unguarded, "closed": run_closed, "materialised": run_materialised}


def child(mode: str, base: Path, tuned: Path) -> None:
    import resource

    with PeakAnon() as anon:
        start = time.perf_counter()
        result = MODES[mode](base, tuned)
        wall = time.perf_counter() - start
    result |= {"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
               / 1024, "peak_anon_mib": anon.peak_kib / 1024}
    print(json.dumps(result))


def measure(mode: str, base: Path, tuned: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(base), str(tuned)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("tuned", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--adapter", type=Path,
                        help="also time a DoRA adapter for BASE: closed form vs materialised B·A")
    parser.add_argument("--modes", default="io,naive,ours,pread",
                        help="which to run; drop naive where both state dicts exceed memory")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.tuned)
        return

    modes = args.modes.split(",")
    measure("io", args.base, args.tuned)  # warm the page cache
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for mode in modes:
            r = measure(mode, args.base, args.tuned)
            if mode not in best or r["wall_s"] < best[mode]["wall_s"]:
                best[mode] = r
    size = best.get("io", {}).get("bytes")
    print(f"pair: {args.base} vs {args.tuned}"
          + (f" ({size / 2**30:.2f} GiB in all)" if size else "")
          + f"; best of {args.repeat}, warm page cache")
    print(f"{'method':<8}{'wall s':>9}{'peak RSS MiB':>15}{'peak private MiB':>19}"
          f"{'time / naive':>15}{'private / naive':>18}")
    naive = best.get("naive")
    for mode in modes:
        r = best[mode]
        ratio_t = f"{r['wall_s'] / naive['wall_s']:.2f}" if naive else "-"
        ratio_m = f"{r['peak_anon_mib'] / naive['peak_anon_mib']:.3f}" if naive else "-"
        print(f"{mode:<8}{r['wall_s']:>9.2f}{r['peak_rss_mib']:>15.0f}{r['peak_anon_mib']:>19.0f}"
              f"{ratio_t:>15}{ratio_m:>18}")
    if args.adapter:
        adapter: dict[str, dict] = {}
        for _ in range(args.repeat):
            for mode in ("closed", "materialised"):
                r = measure(mode, args.base, args.adapter)
                if mode not in adapter or r["wall_s"] < adapter[mode]["wall_s"]:
                    adapter[mode] = r
        closed, mat = adapter["closed"], adapter["materialised"]
        print(f"adapter {args.adapter}: closed form {closed['wall_s']:.2f} s "
              f"({closed['peak_anon_mib']:.0f} MiB private), materialised B·A "
              f"{mat['wall_s']:.2f} s ({mat['peak_anon_mib']:.0f} MiB private); "
              f"closed / materialised = {closed['wall_s'] / mat['wall_s']:.2f}")
        rel = [abs(closed["deltas"][k][1] - mat["deltas"][k][1]) / mat["deltas"][k][1]
               for k in mat["deltas"] if mat["deltas"][k][1] > 0]
        print(f"  closed form vs materialised ΔD: max relative difference {max(rel):.1e}")
    if "ours" in best and naive:
        ours, nv = best["ours"]["deltas"], naive["deltas"]
        rel = [abs(nv[k][1] - ours[k][1]) / ours[k][1] for k in ours if ours[k][1] > 0]
        print(f"naive float32 ΔD vs ours (float64): median relative error "
              f"{sorted(rel)[len(rel) // 2]:.2e}, max {max(rel):.2e} over {len(rel)} matrices")


if __name__ == "__main__":
    main()
