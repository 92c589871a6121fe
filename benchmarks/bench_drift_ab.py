"""``weight_drift`` on one FT-like fp32 pair, for an A/B between two trees in the same hour::

    for tree in /path/to/before /path/to/after; do
        PYTHONPATH=$tree python benchmarks/bench_drift_ab.py --label $tree
    done

W0 ~ N(0, 0.02²) of ``--rows`` × 1.5·rows, Wt = W0 + N(0, 2e-4²); prints seconds and the values.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from dora_analysis.metrics.drift import weight_drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--label", default="this tree")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((args.rows, args.rows * 3 // 2)).astype(np.float32) * 0.02
    wt = w0 + rng.standard_normal(w0.shape).astype(np.float32) * 2e-4
    start = time.perf_counter()
    values = weight_drift(w0, wt, 16)
    seconds = time.perf_counter() - start
    print(f"{args.label}: weight_drift {w0.shape[0]}x{w0.shape[1]} {seconds:.2f} s", values)


if __name__ == "__main__":
    main()
