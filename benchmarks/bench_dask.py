"""Speed-up of the analysis on a Dask cluster of 1, 2 and 4 local worker processes.

    python benchmarks/bench_dask.py bench-output/pair-1b/base bench-output/pair-1b/tuned
    python benchmarks/bench_dask.py BASE TUNED --workers 1,2,4 --repeat 3 --scheduler tcp://H:8786

For each worker count a ``LocalCluster`` of that many processes (one thread each) is started,
warmed up with one untimed run (imports, page cache), then ``analyze(..., client=)`` is timed
``--repeat`` times; printed: the median wall time and the speed-up over the first count; every
table is checked to equal the serial one bit for bit. With ``--scheduler`` the given cluster is
timed as it is instead. A machine with N cores cannot give more than N× (this one: 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import pandas as pd
from distributed import Client, LocalCluster

import dora_analysis as da


def timed_runs(client: Client, base: Path, tuned: Path, repeat: int) -> list[float]:
    """Wall times of ``repeat`` runs after a warm-up; every table checked against a serial one."""
    serial = da.analyze(base, tuned, workers=1)
    tables = [da.analyze(base, tuned, client=client)]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        tables.append(da.analyze(base, tuned, client=client))
        times.append(time.perf_counter() - start)
    for table in tables:
        pd.testing.assert_frame_equal(table, serial, check_exact=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("tuned", type=Path)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scheduler", help="time this cluster instead of local ones")
    args = parser.parse_args()
    base, tuned = args.base.absolute(), args.tuned.absolute()
    results: dict[str, list[float]] = {}
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
    print(f"{base} vs {tuned}: median of {args.repeat} runs after a warm-up run")
    for name, times in results.items():
        median = statistics.median(times)
        first = first or median
        print(f"{name:<28}{median:>8.2f} s   speed-up {first / median:.2f}x   "
              f"({', '.join(f'{t:.2f}' for t in times)})")
    print("every table equal to the serial one, bit for bit (checked)")


if __name__ == "__main__":
    main()
