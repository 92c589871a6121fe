"""Time and memory of ``analyze`` against the naive notebook approaches and the I/O floor.

    python benchmarks/make_llama_pair.py --size 1b --out bench-output/pair-1b
    python benchmarks/bench_analyze.py bench-output/pair-1b/base bench-output/pair-1b/tuned \\
        --adapter bench-output/pair-1b/adapter --workers 1,2,4

Every measurement runs in a fresh child process (so its peak memory is its own), the methods
interleaved round after round (``--repeat``), with the files in the page cache (every method is
measured warm; a shared, noisy machine drifts less between neighbours). Medians are printed:

* ``io``    — read every byte of both checkpoints once, in 64 MiB chunks (the floor);
* ``naive`` — load both state dicts fully, then per matrix float32 norms and
  ``1 − cosine_similarity`` (what a one-off notebook does);
* ``lean``  — the lean form of it: both state dicts loaded, float32 torch, the cosine as a dot
  product over the row norms (no temporaries beyond the float32 copies);
* ``ours``  — ``dora_analysis.analyze(base, tuned)`` (defaults: every core, files
  memory-mapped); ``ours-wN`` the same with ``workers=N``; ``mmap``/``pread`` with that reader
  (``mmap`` maps only files a read lease protects, see ``dora_analysis/io/guard.py``);
  ``unguarded`` without the guard's checks around every read (lease, size, mtime, inode), to
  measure what they cost;
* ``cli``   — ``dora-analyze BASE TUNED -q --no-cache`` as a user runs it (its console entry,
  which ends the process as soon as the outputs are written); ``--no-cache`` because the
  results cache, on by default, would answer every round after the first without reading.

Columns: ``wall s`` is the whole child process (interpreter start-up to exit, as a user waits
for it); ``work s`` is the analysis alone (after ``import torch, pandas``), beside ``start s``,
the start-up and imports; ``CPU s`` the child's user + system time (all threads: on a machine
shared with other work, wall time well above CPU time / cores means waiting for a core or the
disk); then peak RSS, peak private (anonymous) memory, and the ratios of ``wall s`` to ``lean``
and to ``io``. Last: the accuracy of the float32 ΔD against ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

#: SPEC §6 / issue 22 on the ~1B pair (the I/O one also on the 7B-shaped pair, ≤ 1.3 there).
TARGETS = {"lean": 0.25, "io": 1.2, "private_mib": 300}
#: What issue 22 hoped for beyond the targets.
MOONSHOTS = {"lean": 0.15, "io": 0.8}


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


def load_both(base: Path, tuned: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    sd0, sdt = {}, {}
    for file in files_of(base):
        sd0 |= load_file(str(file))
    for file in files_of(tuned):
        sdt |= load_file(str(file))
    return sd0, sdt


def run_io(base: Path, tuned: Path) -> dict:
    buf = bytearray(64 << 20)
    total = 0
    for folder in (base, tuned):
        for file in files_of(folder):
            with open(file, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return {"bytes": total}


def float32_deltas(base: Path, tuned: Path, formula) -> dict:
    """Both state dicts loaded whole, then ``formula(a, b) -> (ΔM, ΔD)`` on float32 copies."""
    sd0, sdt = load_both(base, tuned)
    out = {name: formula(w0.float(), sdt[name].float())
           for name, w0 in sd0.items() if w0.dim() >= 2}
    return {"deltas": out}


def run_naive(base: Path, tuned: Path) -> dict:
    import torch

    def formula(a, b):
        dm = (b.norm(dim=1) - a.norm(dim=1)).abs().mean().item()
        return dm, (1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).mean().item()

    return float32_deltas(base, tuned, formula)


def run_lean(base: Path, tuned: Path) -> dict:
    def formula(a, b):
        na, nb = a.norm(dim=1), b.norm(dim=1)
        dot = (a * b).sum(dim=1)  # the cosine as a dot product over the row norms
        return (nb - na).abs().mean().item(), (1 - dot / (na * nb)).mean().item()

    return float32_deltas(base, tuned, formula)


def run_ours(base: Path, tuned: Path, **settings) -> dict:
    import dora_analysis as da

    table = da.analyze(base, tuned, **settings)
    return {"deltas": {r.name: (r.delta_m, r.delta_d) for r in table.itertuples()}}


def run_unguarded(base: Path, tuned: Path) -> dict:
    from dora_analysis.io import guard

    guard.GuardedFile.check = lambda self: None
    guard.GuardedFile.lease_broken = lambda self: False
    return run_ours(base, tuned)


def ours_mode(mode: str):
    """``ours``, ``ours-w2`` (workers), ``mmap``/``pread`` (reader), ``closed``/``materialised``."""
    settings: dict = {}
    if mode.startswith("ours-w"):
        settings["workers"] = int(mode.removeprefix("ours-w"))
    elif mode in ("mmap", "pread"):
        settings["io"] = mode
    elif mode in ("closed", "materialised"):
        settings["closed_form"] = mode == "closed"
    return lambda base, tuned: run_ours(base, tuned, **settings)


def run_cli(base: Path, tuned: Path) -> dict:
    """``dora-analyze BASE TUNED -q --no-cache`` through its console entry; the process ends
    there (the result is printed by an exit handler, which the quick exit runs)."""
    from dora_analysis import console

    sys.argv = ["dora-analyze", str(base), str(tuned), "-q", "--no-cache"]
    console.analyze()  # never returns


def method(mode: str):
    plain = {"io": run_io, "naive": run_naive, "lean": run_lean, "unguarded": run_unguarded,
             "cli": run_cli}
    return plain.get(mode) or ours_mode(mode)


#: What each method imports before its work (the rest of its start-up is the interpreter's).
NAIVE_IMPORTS = ("torch", "safetensors.torch")
IMPORTS = {"io": (), "naive": NAIVE_IMPORTS, "lean": NAIVE_IMPORTS, "cli": (),
           "ours": ("dora_analysis.analysis",)}


def child(mode: str, base: Path, tuned: Path, started: float) -> None:
    import atexit
    import importlib
    import resource

    begin = time.time()
    for module in IMPORTS.get(mode, IMPORTS["ours"]):  # start-up, timed apart from the work
        importlib.import_module(module)
    anon = PeakAnon().__enter__()
    start = time.perf_counter()
    result: dict = {}

    def report() -> None:
        work = time.perf_counter() - start
        anon.__exit__()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps(result | {
            "work_s": work, "start_s": time.time() - started - work,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
            "peak_anon_mib": anon.peak_kib / 1024, "child_s": time.time() - begin}), flush=True)

    atexit.register(report)  # also after the command line's quick exit
    result |= method(mode)(base, tuned)


def measure(mode: str, base: Path, tuned: Path) -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(base), str(tuned),
                           "--started", repr(start)], capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_s": wall}


def medians(runs: list[dict]) -> dict:
    keys = ("wall_s", "work_s", "start_s", "cpu_s", "peak_rss_mib", "peak_anon_mib")
    return runs[0] | {k: statistics.median(r[k] for r in runs) for k in keys}


def run_rounds(modes: list[str], base: Path, tuned: Path, repeat: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeat):
        for mode in modes:
            runs[mode].append(measure(mode, base, tuned))
    return {m: medians(r) for m, r in runs.items()}


def ratio(a: dict, b: dict | None) -> str:
    return f"{a['wall_s'] / b['wall_s']:.2f}" if b else "-"


def print_table(res: dict[str, dict]) -> None:
    lean, io = res.get("lean"), res.get("io")
    print(f"{'method':<14}{'wall s':>8}{'work s':>8}{'start s':>8}{'CPU s':>8}{'peak RSS MiB':>14}"
          f"{'private MiB':>13}{'/ lean':>8}{'/ io':>7}")
    for mode, r in res.items():
        print(f"{mode:<14}{r['wall_s']:>8.2f}{r['work_s']:>8.2f}{r['start_s']:>8.2f}"
              f"{r['cpu_s']:>8.2f}{r['peak_rss_mib']:>14.0f}{r['peak_anon_mib']:>13.0f}"
              f"{ratio(r, lean):>8}{ratio(r, io):>7}")


def print_targets(res: dict[str, dict], *, io_target: float = TARGETS["io"]) -> None:
    lean, io = res.get("lean"), res.get("io")
    for name in ("ours", "cli"):
        ours = res.get(name)
        if not ours:
            continue
        checks = []
        if lean:
            checks.append(("wall / lean naive", ours["wall_s"] / lean["wall_s"], TARGETS["lean"],
                           MOONSHOTS["lean"]))
        if io:
            checks.append(("wall / I/O floor", ours["wall_s"] / io["wall_s"], io_target,
                           MOONSHOTS["io"]))
            checks.append(("work / I/O floor work (start-up excluded)",
                           ours["work_s"] / io["work_s"], io_target, None))
        checks.append(("peak private MiB", ours["peak_anon_mib"], TARGETS["private_mib"], None))
        for what, value, target, moon in checks:
            verdict = "met" if value <= target else f"missed by {value / target:.2f}x"
            if moon is not None and value <= moon:
                verdict += f", moonshot <= {moon} met"
            print(f"  {name} {what}: {value:.2f} (target <= {target}: {verdict})")


def print_accuracy(res: dict[str, dict]) -> None:
    ours = res.get("ours", {}).get("deltas")
    for mode in ("naive", "lean"):
        if ours and mode in res:
            other = res[mode]["deltas"]
            rel = sorted(abs(other[k][1] - ours[k][1]) / ours[k][1] for k in ours if ours[k][1])
            print(f"{mode} float32 ΔD vs ours (float64): median relative error "
                  f"{rel[len(rel) // 2]:.1e}, max {rel[-1]:.1e} over {len(rel)} matrices")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("tuned", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--modes", default="io,lean,naive,ours,cli",
                        help="methods, comma-separated: io, lean, naive, ours, cli, ours-wN, "
                        "mmap, pread, unguarded (drop the naive ones where both state dicts "
                        "exceed memory)")
    parser.add_argument("--io-target", type=float, default=TARGETS["io"],
                        help="the target ratio to the I/O floor (1.3 for the 7B-shaped pair)")
    parser.add_argument("--workers", help="also time ours with these worker counts (1,2,4)")
    parser.add_argument("--adapter", type=Path,
                        help="also time a DoRA adapter for BASE: closed form vs materialised B·A")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.tuned, args.started)
        return

    modes = args.modes.split(",")
    if args.workers:
        modes += [f"ours-w{n}" for n in args.workers.split(",")]
    measure("io", args.base, args.tuned)  # warm the page cache
    res = run_rounds(modes, args.base, args.tuned, args.repeat)
    size = res.get("io", {}).get("bytes")
    print(f"pair: {args.base} vs {args.tuned}"
          + (f" ({size / 2**30:.2f} GiB in all)" if size else "")
          + f"; median of {args.repeat} interleaved rounds, warm page cache")
    print_table(res)
    print_targets(res, io_target=args.io_target)
    if args.workers:
        counts = [int(n) for n in args.workers.split(",")]
        one = res[f"ours-w{counts[0]}"]
        print("workers: " + ", ".join(
            f"{n}: {res[f'ours-w{n}']['wall_s']:.2f} s wall, {res[f'ours-w{n}']['work_s']:.2f} s "
            f"work (work speed-up {one['work_s'] / res[f'ours-w{n}']['work_s']:.2f}x)"
            for n in counts))
    print_accuracy(res)
    if args.adapter:
        ad = run_rounds(["closed", "materialised"], args.base, args.adapter, args.repeat)
        closed, mat = ad["closed"], ad["materialised"]
        print(f"adapter {args.adapter}:")
        print_table(ad)
        print(f"  closed form / materialised B·A: {closed['wall_s'] / mat['wall_s']:.2f} wall, "
              f"{closed['work_s'] / mat['work_s']:.2f} work")
        rel = [abs(closed["deltas"][k][1] - mat["deltas"][k][1]) / mat["deltas"][k][1]
               for k in mat["deltas"] if mat["deltas"][k][1] > 0]
        print(f"  closed form vs materialised ΔD: max relative difference {max(rel):.1e}")


if __name__ == "__main__":
    main()
