"""Speed-up of the analysis on a Dask cluster of 1, 2 and 4 local worker processes.

    python benchmarks/bench_dask.py bench-output/pair-1b/base bench-output/pair-1b/tuned
    python benchmarks/bench_dask.py BASE TUNED --workers 1,2,4 --repeat 3 --scheduler tcp://H:8786

For each worker count a ``LocalCluster`` of that many processes (one thread each) is started,
warmed up with one untimed run (imports, page cache), then ``analyze(..., client=)`` is timed
``--repeat`` times; printed: the median wall time, the speed-up over the first count, and how
many units each worker executed in the timed runs (every worker must have worked); every table
is checked to equal the serial one bit for bit. With ``--scheduler`` the given cluster is timed
as it is instead.

Use a pair whose work dominates the scheduling (a few ms per unit): the ~1B pair of
``make_llama_pair.py --size 1b`` (2 × 2 GiB, ~1 300 units). A machine with N cores cannot give
more than N×: on 2 cores, 4 worker processes share the 2 cores with the scheduler and the
client, so they can only match 2 — and lose a little to switching.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import pandas as pd
from distributed import Client, LocalCluster

import dora_analysis as da


def executed(client: Client) -> dict[str, int]:
    """Tasks each worker has executed so far."""
    return client.run(lambda dask_worker: dask_worker.state.executed_count)


def timed_runs(client: Client, base: Path, tuned: Path, repeat: int
               ) -> tuple[list[float], list[int]]:
    """Wall times of ``repeat`` runs after a warm-up, and the units each worker executed in
    them; every table checked against a serial one."""
    serial = da.analyze(base, tuned, workers=1)
    tables = [da.analyze(base, tuned, client=client)]
    before = executed(client)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        tables.append(da.analyze(base, tuned, client=client))
        times.append(time.perf_counter() - start)
    after = executed(client)
    for table in tables:
        pd.testing.assert_frame_equal(table, serial, check_exact=True)
    return times, sorted(after[w] - before.get(w, 0) for w in after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("tuned", type=Path)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scheduler", help="time this cluster instead of local ones")
    args = parser.parse_args()
    base, tuned = args.base.absolute(), args.tuned.absolute()
    results: dict[str, tuple[list[float], list[int]]] = {}
    if args.scheduler:
        with Client(args.scheduler) as client:
            n = len(client.scheduler_info()["workers"])
            results[f"{args.scheduler} ({n} workers)"] = timed_runs(client, base, tuned,
                                                                   args.repeat)
    else:
        for n in (int(x) for x in args.workers.split(",")):
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                              dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                    Client(cluster) as client:
                results[f"{n} local worker(s)"] = timed_runs(client, base, tuned, args.repeat)
    first = None
    print(f"{base} vs {tuned}: median of {args.repeat} runs after a warm-up run, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for name, (times, units) in results.items():
        median = statistics.median(times)
        first = first or median
        print(f"{name:<28}{median:>8.2f} s   speed-up {first / median:.2f}x   "
              f"({', '.join(f'{t:.2f}' for t in times)})   units per worker {units}")
    print("every table equal to the serial one, bit for bit (checked)")


if __name__ == "__main__":
    main()
