"""The kernel's cost per element against the block size, and the block the machine's caches give.

    python benchmarks/bench_kernel.py                  # bf16, 2048 columns, every core busy
    python benchmarks/bench_kernel.py --threads 1 --dtype float32 --cols 5632
    python benchmarks/bench_kernel.py --kernels        # float64 kernel vs float32 variants

Each block size is timed on in-memory matrices (no I/O) with ``--threads`` threads running the
kernel at once (each on its own matrices, as the analysis's workers do), sizes interleaved and
repeated; printed: the median CPU nanoseconds per element pair (each thread's own CPU time, so
other processes on a shared machine disturb it less than wall time), the ratio to the best size,
and the size :func:`dora_analysis.config.choose_block_elements` picks from this machine's caches.

``--kernels`` times, at the chosen block, the analysis's float64 kernel against two cheaper-looking
ones — the difference in float32 then float64 sums, and everything in float32 — and prints each
one's worst relative ΔD error against a float64 NumPy reference on an FT-sized pair (ΔD ~ 1e-6).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from dora_analysis.config import DEFAULT_BLOCK_ELEMENTS, WORKING_BYTES_PER_ELEMENT
from dora_analysis.decompose import (
    PairAccumulator,
    VectorSums,
    Workspace,
    direction_change,
    rows_per_block,
)
from dora_analysis.hardware import caches, usable_cpus

F64 = torch.float64


def kernel_f32_difference(a: torch.Tensor, b: torch.Tensor, ws: list) -> torch.Tensor:
    """``wt − w0`` in float32 (exact for nearby bf16/fp16), every sum in float64."""
    d = torch.sub(b.float(), a.float())
    return torch.stack([torch.linalg.vector_norm(x, dim=1, dtype=F64) for x in (a, b, d)])


def kernel_f32(a: torch.Tensor, b: torch.Tensor, ws: list) -> torch.Tensor:
    """Everything in float32 (what a notebook does), for the cost and the error it buys."""
    x0, xt = a.float(), b.float()
    return torch.stack([torch.linalg.vector_norm(x, dim=1) for x in (x0, xt, xt - x0)]).double()


def kernel_f64(a: torch.Tensor, b: torch.Tensor, ws: list) -> torch.Tensor:
    """The analysis's kernel (``decompose.squared_norms``), as its accumulator calls it."""
    from dora_analysis.decompose import squared_norms

    return squared_norms(a, b, ("out",), ws[0])["out"].sqrt()


KERNELS = {"float64 (ours)": kernel_f64, "float32 difference": kernel_f32_difference,
           "float32": kernel_f32}


def compare_kernels(dtype: torch.dtype, cols: int, block: int, repeat: int) -> None:
    import numpy as np

    rows = max(1, (1 << 24) // cols)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=g, dtype=F64) * 0.02
    w0 = w.to(dtype)
    wt = (w * (1 + 1.4e-3 * torch.randn(rows, cols, generator=g, dtype=F64))).to(dtype)
    a, b = w0.double().numpy(), wt.double().numpy()
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ref = 0.5 * np.square(a / na[:, None] - b / nb[:, None]).sum(1)  # 1 − cos, another formula
    step = rows_per_block(cols, block)
    print(f"kernels at block {block} ({dtype}, {rows} x {cols}, ΔD ≈ {ref.mean():.1e}):")
    print(f"{'kernel':<22}{'CPU ns/el':>12}{'max rel. ΔD error':>20}")
    for name, kernel in KERNELS.items():
        ws, times = [Workspace()], []
        for _ in range(repeat):
            start = time.thread_time()
            norms = torch.cat([kernel(w0[r: r + step], wt[r: r + step], ws)
                               for r in range(0, rows, step)], dim=1)
            times.append(time.thread_time() - start)
        dd = direction_change(VectorSums(*norms.square())).numpy()
        err = np.max(np.abs(dd - ref) / ref)
        print(f"{name:<22}{statistics.median(times) / w0.numel() * 1e9:>12.3f}{err:>20.1e}")


def time_kernel(w0: torch.Tensor, wt: torch.Tensor, block: int, axes: tuple[str, ...],
                workspace: Workspace) -> float:
    rows, cols = w0.shape
    step = rows_per_block(cols, block)
    start = time.thread_time()
    acc = PairAccumulator(rows, cols, axes, workspace=workspace)
    for r in range(0, rows, step):
        acc.add(w0[r: r + step], wt[r: r + step])
    acc.sums()
    return time.thread_time() - start


def run(block: int, threads: int, mats: list[tuple[torch.Tensor, torch.Tensor]],
        axes: tuple[str, ...]) -> float:
    """Nanoseconds per element pair with ``threads`` threads each streaming its own matrices."""
    times = [0.0] * threads
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        ws = Workspace()
        w0, wt = mats[i]
        time_kernel(w0[:1], wt[:1], block, axes, ws)  # allocate the buffer outside the timing
        barrier.wait()
        times[i] = time_kernel(w0, wt, block, axes, ws)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return max(times) / mats[0][0].numel() * 1e9


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
    args = parser.parse_args()
    threads = args.threads or usable_cpus()
    torch.set_num_threads(1)  # as the analysis runs it: one core per worker
    dtype = getattr(torch, args.dtype)
    if args.kernels:
        compare_kernels(dtype, args.cols, DEFAULT_BLOCK_ELEMENTS, args.repeat)
        return
    rows = max(1, args.elements // args.cols)
    g = torch.Generator().manual_seed(0)
    mats = []
    for _ in range(threads):
        w = torch.randn(rows, args.cols, generator=g) * 0.02
        mats.append((w.to(dtype), (w + 3e-5 * torch.randn(w.shape, generator=g)).to(dtype)))
    axes = ("out", "in") if args.axis == "both" else (args.axis,)
    lo, hi = (int(x) for x in args.log2.split("-"))
    sizes = [1 << k for k in range(lo, hi + 1)]
    samples: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(args.repeat):
        for b in sizes:
            samples[b].append(run(b, threads, mats, axes))
    medians = {b: statistics.median(v) for b, v in samples.items()}
    best = min(medians.values())
    known = ", ".join(f"L{c.level} {c.size >> 10} KiB/{c.shared_by} cpu" for c in caches())
    print(f"caches: {known}; {threads} thread(s), {args.dtype}, {args.cols} columns, "
          f"axis {args.axis}, median of {args.repeat}")
    print(f"{'block':>10}{'working set':>14}{'CPU ns/el':>12}{'/ best':>8}")
    for b in sizes:
        mark = "  <- chosen" if b == DEFAULT_BLOCK_ELEMENTS else ""
        print(f"{'2^' + str(b.bit_length() - 1):>10}{b * WORKING_BYTES_PER_ELEMENT >> 10:>10} KiB"
              f"{medians[b]:>12.3f}{medians[b] / best:>8.2f}{mark}")
    if DEFAULT_BLOCK_ELEMENTS not in medians:
        print(f"chosen block: {DEFAULT_BLOCK_ELEMENTS} elements (not in the range timed)")


if __name__ == "__main__":
    main()
