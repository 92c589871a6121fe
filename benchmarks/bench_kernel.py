"""The fused kernel's cost per element against the block size, its compile and load cost, and
what a float32 kernel would buy.

    python benchmarks/bench_kernel.py                  # bf16, 2048 columns, every core busy
    python benchmarks/bench_kernel.py --threads 1 --dtype float32 --cols 5632 --axis both
    python benchmarks/bench_kernel.py --compile        # first run (compile) against a cached one
    python benchmarks/bench_kernel.py --kernels        # the float64 kernel vs float32 arithmetic

Block sizes: each is timed with ``--threads`` threads at once, each streaming its own in-memory
matrices block by block as the ``pread`` reader feeds the kernel — the block copied into a reused
buffer (the copy ``pread`` makes from the page cache), then reduced — sizes interleaved and
repeated; printed: the median CPU nanoseconds per element pair (each thread's own CPU time, so
other processes on a shared machine disturb it less than wall time), the ratio to the best size,
and the size :func:`dora_analysis.hardware.choose_block_elements` picks from this machine's
caches. Memory-mapped files (the default reader) are reduced in place, a whole piece at a time.

``--compile`` runs the kernel in fresh processes with an empty cache folder (numba compiles it)
and again with that folder (numba loads it), and prints the time of the first call in each.

``--kernels`` times, at the chosen block, the analysis's kernel against the same sums with
float32 arithmetic (numpy), and prints each one's worst relative ΔD error against a float64
reference on an FT-sized pair (ΔD ~ 1e-6).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from dora_analysis.decompose import VectorSums, direction_change, rows_per_block
from dora_analysis.hardware import (
    DEFAULT_BLOCK_ELEMENTS,
    WORKING_BYTES_PER_ELEMENT,
    caches,
    usable_cpus,
)
from dora_analysis.kernel import accumulate


def stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values as the readers hand them to the kernel (bfloat16 as its bits)."""
    if dtype == "bfloat16":
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(dtype)


def exact(w: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return w.astype(np.float64)


def time_blocks(w0: np.ndarray, wt: np.ndarray, block: int, axes: tuple[str, ...],
                buffers: tuple[np.ndarray, np.ndarray]) -> float:
    """CPU seconds of this thread for the whole pair, block by block through the buffers."""
    rows, cols = w0.shape
    step = rows_per_block(cols, block)
    out_rows = np.empty((3, rows)) if "out" in axes else None
    out_cols = np.zeros((3, cols)) if "in" in axes else None
    start = time.thread_time()
    for r in range(0, rows, step):
        n = min(rows, r + step) - r
        a = buffers[0][: n * cols].reshape(n, cols)
        b = buffers[1][: n * cols].reshape(n, cols)
        np.copyto(a, w0[r: r + n])  # what pread does from the page cache
        np.copyto(b, wt[r: r + n])
        accumulate(a, b, None if out_rows is None else out_rows[:, r: r + n], out_cols)
    return time.thread_time() - start


def run(block: int, mats: list[tuple[np.ndarray, np.ndarray]], axes: tuple[str, ...]) -> float:
    """Nanoseconds per element pair with one thread per pair in ``mats``, all at once."""
    times = [0.0] * len(mats)
    barrier = threading.Barrier(len(mats))

    def work(i: int) -> None:
        w0, wt = mats[i]
        n = rows_per_block(w0.shape[1], block) * w0.shape[1]
        buffers = (np.empty(n, dtype=w0.dtype), np.empty(n, dtype=wt.dtype))
        time_blocks(w0[:1], wt[:1], block, axes, buffers)  # compiled/loaded outside the timing
        barrier.wait()
        times[i] = time_blocks(w0, wt, block, axes, buffers)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(len(mats))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return max(times) / mats[0][0].size * 1e9


FIRST_CALL = """
import time, numpy as np
start = time.perf_counter()
from dora_analysis.kernel import accumulate
imported = time.perf_counter()
a = np.zeros((4, 8), dtype=np.{0})
accumulate(a, a, np.empty((3, 4)), {1})
print(imported - start, time.perf_counter() - imported)
"""


def compile_cost(dtype: str, axis: str) -> None:
    """The first call in a fresh process: compiled (empty cache), then loaded from the cache."""
    kind = {"bfloat16": "uint16"}.get(dtype, dtype)
    cols = "np.zeros((3, 8))" if axis in ("in", "both") else "None"
    code = FIRST_CALL.format(kind, cols)
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as folder:
        env = os.environ | {"NUMBA_CACHE_DIR": folder, "PYTHONPATH": str(root)}
        for what in ("compiled (empty cache)", "loaded from the cache", "loaded again"):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()
            print(f"{what:<24} import numba + kernel {float(out[0]):.2f} s, "
                  f"first call {float(out[1]):.2f} s")


def compare_kernels(dtype: str, cols: int, block: int, repeat: int) -> None:
    rows = max(1, (1 << 24) // cols)
    g = np.random.default_rng(1)
    w = g.standard_normal((rows, cols)) * 0.02
    w0 = stored(w, dtype)
    wt = stored(w * (1 + 1.4e-3 * g.standard_normal((rows, cols))), dtype)
    a, b = exact(w0, dtype), exact(wt, dtype)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ref = 0.5 * np.square(a / na[:, None] - b / nb[:, None]).sum(1)  # 1 − cos, another formula
    step = rows_per_block(cols, block)

    def ours() -> np.ndarray:
        out = np.empty((3, rows))
        for r in range(0, rows, step):
            accumulate(w0[r: r + step], wt[r: r + step], out[:, r: r + step])
        return out

    def float32() -> np.ndarray:
        out = np.empty((3, rows))
        for r in range(0, rows, step):
            x, y = a[r: r + step].astype(np.float32), b[r: r + step].astype(np.float32)
            out[:, r: r + step] = [np.einsum("ij,ij->i", v, v) for v in (x, y, y - x)]
        return out

    print(f"kernels at block {block} ({dtype}, {rows} x {cols}, ΔD ≈ {ref.mean():.1e}):")
    print(f"{'kernel':<28}{'CPU ns/el':>12}{'max rel. ΔD error':>20}")
    for name, kernel in (("fused float64 (ours)", ours), ("float32 arithmetic (numpy)", float32)):
        kernel()
        times = []
        for _ in range(repeat):
            start = time.thread_time()
            sums = kernel()
            times.append(time.thread_time() - start)
        dd = direction_change(VectorSums(*sums))
        err = np.max(np.abs(dd - ref) / ref)
        print(f"{name:<28}{statistics.median(times) / w0.size * 1e9:>12.3f}{err:>20.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="default: every usable core")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--elements", type=int, default=1 << 25, help="per thread and run")
    parser.add_argument("--axis", default="out", choices=("out", "in", "both"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--log2", default="14-22", help="block sizes 2^a .. 2^b")
    parser.add_argument("--kernels", action="store_true",
                        help="compare kernels at the chosen block instead (one thread)")
    parser.add_argument("--compile", action="store_true",
                        help="time the kernel's first call, compiled and cached")
    args = parser.parse_args()
    if args.compile:
        compile_cost(args.dtype, args.axis)
        return
    if args.kernels:
        compare_kernels(args.dtype, args.cols, DEFAULT_BLOCK_ELEMENTS, args.repeat)
        return
    threads = args.threads or usable_cpus()
    rows = max(1, args.elements // args.cols)
    g = np.random.default_rng(0)
    mats = []
    for _ in range(threads):
        w = g.standard_normal((rows, args.cols)) * 0.02
        mats.append((stored(w, args.dtype),
                     stored(w + 3e-5 * g.standard_normal(w.shape), args.dtype)))
    axes = ("out", "in") if args.axis == "both" else (args.axis,)
    lo, hi = (int(x) for x in args.log2.split("-"))
    sizes = [1 << k for k in range(lo, hi + 1)]
    samples: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(args.repeat):
        for b in sizes:
            samples[b].append(run(b, mats, axes))
    medians = {b: statistics.median(v) for b, v in samples.items()}
    best = min(medians.values())
    known = ", ".join(f"L{c.level} {c.size >> 10} KiB/{c.shared_by} cpu" for c in caches())
    print(f"caches: {known}; {threads} thread(s), {args.dtype}, {args.cols} columns, "
          f"axis {args.axis}, median of {args.repeat}")
    print(f"{'block':>10}{'budget':>14}{'CPU ns/el':>12}{'/ best':>8}")
    for b in sizes:
        mark = "  <- chosen" if b == DEFAULT_BLOCK_ELEMENTS else ""
        print(f"{'2^' + str(b.bit_length() - 1):>10}{b * WORKING_BYTES_PER_ELEMENT >> 10:>10} KiB"
              f"{medians[b]:>12.3f}{medians[b] / best:>8.2f}{mark}")
    if DEFAULT_BLOCK_ELEMENTS not in medians:
        print(f"chosen block: {DEFAULT_BLOCK_ELEMENTS} elements (not in the range timed)")


if __name__ == "__main__":
    main()
