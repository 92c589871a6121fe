"""Cost of ``--spectrum`` and ``--intruders`` on one 4096 × 4096 full-fine-tuning-shaped pair, as
ratios to baselines measured in the same run, and the agreement of the values.

    python benchmarks/bench_metrics.py                          # 4096², baselines inline
    python benchmarks/bench_metrics.py --baseline-tree /work/main   # today's code, same run
    python benchmarks/bench_metrics.py --size 1024 --repeat 3   # a quick look

Writes a base matrix and an FT-like tuned one (a small dense update plus a rank-8 part, fp32),
and a rank-16 LoRA adapter of the same base (PEFT's file layout), then times, best of
``--repeat``, each in this process after one untimed warm-up call (files in the page cache):

* ``notebook SVD``      — ``np.linalg.svd(ΔW)`` (float64, full, NumPy's default threads) plus
                           the same summaries: the baseline of ``--spectrum`` (target ≤ 0.3×);
* ``notebook, 1 thread`` — the same on one BLAS thread, as ``--spectrum`` runs (one matrix per
                           worker): the like-for-like ratio;
* ``spectrum``          — ``analyze(base, tuned, spectrum=True)``;
* ``intruders, before`` — the previous method on the same matrices: a dense float64 SVD of W0
                           with vectors (torch, one thread) and ARPACK's top 10 of Wt — or, with
                           ``--baseline-tree``, ``analyze(..., intruders=True)`` of that source
                           tree, in a child process with an empty cache;
* ``intruders, cold``   — ``analyze(..., intruders=True)`` with an empty SVD cache (target ≤ 0.3×
                           of "before");
* ``intruders, warm``   — the same with W0's basis cached (every later checkpoint of a series);
* ``plain``, ``LoRA plain``, ``LoRA spectrum`` — for scale;
* the options of issue 23, against ``plain`` (``LoRA …``: against ``LoRA plain``):
  ``sparsity`` (dense, O(N)), ``drift`` (values-only SVDs of W0 and Wt, their top-16 subspaces
  by Lanczos), ``weightwatcher`` (the library on W0 and Wt; left out when it is not installed),
  ``cross-run, 2 runs`` (``compare_runs`` of two FT-like runs: both updates read, the four
  measures of their one pair), ``LoRA sparsity`` (the merge rounded to the base's dtype),
  ``LoRA cross-run`` (two adapters: cosine and subspaces from the factors, ΔW materialised for
  the sign conflict). ``--only-new`` times ``plain``, ``LoRA plain`` and these only.

Then the spectrum columns are compared with the notebook's (relative differences; the energy
rank must be equal) and the intruder counts with the previous method's. The machine's noise
affects all rows alike: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import dora_analysis as da

NAME = "model.layers.0.self_attn.q_proj.weight"
SPECTRUM = ("sigma_1", "stable_rank", "effective_rank", "amplification", "energy_rank_90")


def write_pair(folder: Path, size: int, rank: int) -> tuple[Path, Path, Path]:
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(size, size, generator=g) / size**0.5
    update = 1e-3 * torch.randn(size, size, generator=g) / size**0.5 + 1e-2 * (
        torch.randn(size, 8, generator=g) @ torch.randn(8, size, generator=g)) / size
    save_file({NAME: w0}, str(folder / "base.safetensors"))
    save_file({NAME: (w0 + update).contiguous()}, str(folder / "tuned.safetensors"))
    adapter = write_adapter(folder / "adapter", size, rank, g)
    return folder / "base.safetensors", folder / "tuned.safetensors", adapter


def write_adapter(folder: Path, size: int, rank: int, g: torch.Generator) -> Path:
    """A rank-``rank`` PEFT LoRA adapter of the benchmark's matrix."""
    folder.mkdir()
    module = NAME.removesuffix(".weight")
    save_file({f"base_model.model.{module}.lora_A.weight": torch.randn(rank, size, generator=g),
               f"base_model.model.{module}.lora_B.weight": 1e-3 * torch.randn(size, rank,
                                                                               generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}))
    return folder


def write_second_run(folder: Path, size: int, rank: int) -> tuple[Path, Path]:
    """Another FT-like run and another adapter of the same base (for the cross-run rows)."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    w0 = load_file(str(folder / "base.safetensors"))[NAME]
    update = 1e-3 * torch.randn(size, size, generator=g) / size**0.5
    save_file({NAME: (w0 + update).contiguous()}, str(folder / "tuned2.safetensors"))
    return folder / "tuned2.safetensors", write_adapter(folder / "adapter2", size, rank, g)


def new_options(base: Path, tuned: Path, adapter: Path, root: Path, size: int, rank: int,
                repeat: int) -> dict[str, float]:
    """Seconds of the options of issue 23, timed like the others."""
    import importlib.util

    tuned2, adapter2 = write_second_run(root, size, rank)
    runs = {
        "sparsity": lambda: da.analyze(base, tuned, sparsity=True),
        "drift": lambda: da.analyze(base, tuned, drift=True),
        "weightwatcher": lambda: da.analyze(base, tuned, weightwatcher=True),
        "cross-run, 2 runs": lambda: da.compare_runs(base, [tuned, tuned2], labels=["a", "b"]),
        "LoRA sparsity": lambda: da.analyze(base, adapter, sparsity=True),
        "LoRA cross-run": lambda: da.compare_runs(base, [adapter, adapter2], labels=["a", "b"]),
    }
    if importlib.util.find_spec("weightwatcher") is None:
        del runs["weightwatcher"]
    return {label: best_of(repeat, run)[0] for label, run in runs.items()}


def best_of(repeat: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def notebook_spectrum(base: Path, tuned: Path, r: int = 16, threads: int | None = None
                      ) -> dict[str, float]:
    """What a notebook does: load, ΔW in float64, ``np.linalg.svd`` (full), the summaries."""
    from safetensors.numpy import load_file
    from threadpoolctl import threadpool_limits

    w0 = load_file(str(base))[NAME].astype(np.float64)
    d = load_file(str(tuned))[NAME].astype(np.float64) - w0
    with threadpool_limits(threads, user_api="blas"):
        u, s, vh = np.linalg.svd(d)
    energy = s**2
    p = s[s > 0] / s.sum()
    return {
        "sigma_1": s[0], "stable_rank": energy.sum() / s[0] ** 2,
        "effective_rank": math.exp(-(p * np.log(p)).sum()),
        "energy_rank_90": int(np.argmax(np.cumsum(energy) >= 0.9 * energy.sum())) + 1,
        "amplification": np.linalg.norm(d) / np.linalg.norm(u[:, :r].T @ w0 @ vh[:r].T),
    }


def previous_intruders(base: Path, tuned: Path, k: int = 10, eps: float = 0.5) -> int:
    """The method before the Gram-matrix basis: a dense float64 SVD of W0 with vectors (torch,
    one thread, as the executors ran it) and ARPACK's top k of Wt."""
    from safetensors.numpy import load_file
    from scipy.sparse.linalg import svds

    w0 = load_file(str(base))[NAME].astype(np.float64)
    wt = load_file(str(tuned))[NAME].astype(np.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        u0 = torch.linalg.svd(torch.from_numpy(w0), full_matrices=False)[0].float().double()
    finally:
        torch.set_num_threads(before)
    start = np.random.default_rng(0).standard_normal(min(wt.shape))
    ut, sigma, _ = svds(wt, k=k, v0=start, solver="arpack")
    ut = ut[:, np.argsort(sigma)[::-1]]
    return int((np.abs(ut.T @ u0.numpy()).max(axis=1) < eps).sum())


CHILD = """
import sys, time, tempfile
import dora_analysis as da
base, tuned = sys.argv[1:3]
da.analyze(base, tuned)  # imports and page cache
with tempfile.TemporaryDirectory() as cache:
    start = time.perf_counter()
    table = da.analyze(base, tuned, intruders=True, svd_cache=cache)
    print(time.perf_counter() - start, int(table["intruders"].iloc[0]))
"""


def tree_intruders(tree: Path, base: Path, tuned: Path) -> tuple[float, int]:
    """Seconds and count of ``analyze(..., intruders=True)`` of another source tree."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, str(base), str(tuned)], env=env,
                         capture_output=True, text=True, check=True, cwd=tree)
    seconds, count = out.stdout.split()[-2:]
    return float(seconds), int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16, help="rank of the LoRA adapter")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--baseline-tree", type=Path,
                        help="time this source tree's --intruders as 'before' (a child process)")
    parser.add_argument("--only-new", action="store_true",
                        help="time plain, LoRA plain and the options of issue 23 only")
    args = parser.parse_args(argv)
    if args.only_new:
        return only_new(args)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        root = Path(tmp)
        base, tuned, adapter = write_pair(root, args.size, args.rank)
        cache = root / "svd-cache"
        da.analyze(base, tuned)  # warm-up: imports and the page cache, not timed

        def cold():
            for f in (cache / "base-svd").glob("*"):
                f.unlink()
            return da.analyze(base, tuned, intruders=True, svd_cache=str(cache))

        rows: dict[str, float] = {}
        rows["plain"], _ = best_of(args.repeat, lambda: da.analyze(base, tuned))
        rows["notebook SVD"], notebook = best_of(args.repeat,
                                                 lambda: notebook_spectrum(base, tuned))
        rows["notebook, 1 thread"], _ = best_of(
            args.repeat, lambda: notebook_spectrum(base, tuned, threads=1))
        rows["spectrum"], ours = best_of(args.repeat,
                                         lambda: da.analyze(base, tuned, spectrum=True))
        if args.baseline_tree:
            rows["intruders, before"], before_count = tree_intruders(args.baseline_tree, base,
                                                                      tuned)
        else:
            rows["intruders, before"], before_count = best_of(
                args.repeat, lambda: previous_intruders(base, tuned))
        rows["intruders, cold"], cold_table = best_of(args.repeat, cold)
        rows["intruders, warm"], _ = best_of(args.repeat, lambda: da.analyze(
            base, tuned, intruders=True, svd_cache=str(cache)))
        rows["LoRA plain"], _ = best_of(args.repeat, lambda: da.analyze(base, adapter))
        rows["LoRA spectrum"], _ = best_of(args.repeat, lambda: da.analyze(
            base, adapter, spectrum=True))
        rows |= new_options(base, tuned, adapter, root, args.size, args.rank, args.repeat)
    refs = {"spectrum": "notebook SVD", "notebook, 1 thread": "notebook SVD",
            "intruders, cold": "intruders, before",
            "intruders, warm": "intruders, before", "LoRA spectrum": "LoRA plain"} | NEW_REFS
    print_rows(rows, refs, args, digits=3)
    print(f"spectrum / notebook on one thread: "
          f"{rows['spectrum'] / rows['notebook, 1 thread']:.3f}")
    row = ours.iloc[0]
    print("spectrum against the notebook's float64 SVD (relative difference):")
    for col in SPECTRUM:
        want, got = notebook[col], row[col]
        diff = "equal" if col == "energy_rank_90" and got == want else (
            f"{abs(got - want) / abs(want):.1e}")
        print(f"  {col:<16} ours {got:<22.15g} notebook {want:<22.15g} {diff}")
    count = int(cold_table["intruders"].iloc[0])
    print(f"intruders: ours {count}, before {before_count}"
          + ("" if count == before_count else "  DIFFERENT"))
    return 0


#: The baseline of each row of :func:`new_options`.
NEW_REFS = {"sparsity": "plain", "drift": "plain", "weightwatcher": "plain",
            "cross-run, 2 runs": "plain", "LoRA sparsity": "LoRA plain",
            "LoRA cross-run": "LoRA plain"}


def only_new(args: argparse.Namespace) -> int:
    """``--only-new``: the plain analyses and the options of issue 23."""
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        root = Path(tmp)
        base, tuned, adapter = write_pair(root, args.size, args.rank)
        da.analyze(base, tuned)  # warm-up: imports and the page cache, not timed
        rows = {"plain": best_of(args.repeat, lambda: da.analyze(base, tuned))[0],
                "LoRA plain": best_of(args.repeat, lambda: da.analyze(base, adapter))[0]}
        rows |= new_options(base, tuned, adapter, root, args.size, args.rank, args.repeat)
    print_rows(rows, NEW_REFS, args, digits=1)
    return 0


def print_rows(rows: dict[str, float], refs: dict[str, str], args: argparse.Namespace,
               digits: int) -> None:
    """The timing table: seconds, and the ratio to the row named in ``refs`` (same run)."""
    print(f"one {args.size} × {args.size} fp32 pair (FT-shaped), torch {torch.get_num_threads()} "
          f"threads, best of {args.repeat}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'analysis':<20}{'seconds':>10}{'ratio':>8}  to")
    for label, seconds in rows.items():
        ref = refs.get(label)
        ratio = f"{seconds / rows[ref]:>8.{digits}f}  {ref}" if ref else ""
        print(f"{label:<20}{seconds:>10.2f}{ratio}")


if __name__ == "__main__":
    raise SystemExit(main())
