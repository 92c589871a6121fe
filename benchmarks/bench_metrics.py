"""Cost of ``--spectrum`` and ``--intruders`` on one 4096 × 4096 matrix, as ratios to the plain
ΔM/ΔD analysis of the same matrix measured in the same run.

    python benchmarks/bench_metrics.py                 # 4096 × 4096, fp32, in a temp folder
    python benchmarks/bench_metrics.py --size 1024     # a quick look

Writes a base matrix and an FT-like tuned one (dense small update plus a low-rank part), and a
rank-16 LoRA adapter of the same base (PEFT's file layout), then times, best of ``--repeat``:

* ``plain``            — ``analyze(base, tuned)``: ΔM, ΔD, tangential fraction, warnings;
* ``spectrum``         — ``+ spectrum=True``: a dense float64 SVD of ΔW (with vectors);
* ``intruders, cold``  — ``+ intruders=True`` with an empty SVD cache: the base's full SVD, and
                          the top 10 of Wt by Lanczos;
* ``intruders, warm``  — the same with the base SVD in the cache (every later checkpoint of a
                          series);
* ``LoRA plain`` / ``LoRA spectrum`` — the adapter (closed forms: no B·A, an r × r core);
* ``sparsity``, ``drift``, ``weightwatcher`` — ``+ sparsity=True`` (dense, O(N)), ``+ drift=True``
  (values-only SVDs of W0 and Wt, top-16 subspaces by Lanczos), ``+ weightwatcher=True`` (the
  weightwatcher library on W0 and Wt; skipped when it is not installed);
* ``cross-run, 2 runs`` — ``compare_runs(base, [tuned, tuned2])``: read both updates, four
  measures for the one pair (against ``plain``: one pair analysed, not two);
* ``LoRA sparsity`` / ``LoRA cross-run`` — the same for rank-r adapters (the merged weight
  rounded to the base's dtype; cosine and subspaces from the factors, ΔW materialised for the
  sign conflict).

Each measurement is one call of ``analyze`` in this process after one untimed warm-up call (the
files stay in the page cache);
the machine's noise affects all rows alike, so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import dora_analysis as da

NAME = "model.layers.0.self_attn.q_proj.weight"


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
    """The options of issue 23, timed like the others."""
    import importlib.util

    tuned2, adapter2 = write_second_run(root, size, rank)
    rows = {
        "sparsity": best_of(repeat, lambda: da.analyze(base, tuned, sparsity=True)),
        "drift": best_of(repeat, lambda: da.analyze(base, tuned, drift=True)),
    }
    if importlib.util.find_spec("weightwatcher") is not None:
        rows["weightwatcher"] = best_of(repeat, lambda: da.analyze(base, tuned,
                                                                   weightwatcher=True))
    rows["cross-run, 2 runs"] = best_of(repeat, lambda: da.compare_runs(
        base, [tuned, tuned2], labels=["a", "b"]))
    rows["LoRA sparsity"] = best_of(repeat, lambda: da.analyze(base, adapter, sparsity=True))
    rows["LoRA cross-run"] = best_of(repeat, lambda: da.compare_runs(
        base, [adapter, adapter2], labels=["a", "b"]))
    return rows


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16, help="rank of the LoRA adapter")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only-new", action="store_true",
                        help="time plain, LoRA plain and the options of issue 23 only")
    parser.add_argument("--skip-new", action="store_true",
                        help="leave out the options of issue 23 (sparsity, drift, …)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        root = Path(tmp)
        base, tuned, adapter = write_pair(root, args.size, args.rank)
        cache = root / "svd-cache"
        da.analyze(base, tuned)  # warm-up: imports and the page cache, not timed

        def cold():
            for f in (cache / "base-svd").glob("*.npy"):
                f.unlink()
            da.analyze(base, tuned, intruders=True, svd_cache=str(cache))

        rows = {"plain": best_of(args.repeat, lambda: da.analyze(base, tuned)),
                "LoRA plain": best_of(args.repeat, lambda: da.analyze(base, adapter))}
        if not args.only_new:
            rows |= {
                "spectrum": best_of(args.repeat, lambda: da.analyze(base, tuned, spectrum=True)),
                "intruders, cold": best_of(args.repeat, cold),
                "intruders, warm": best_of(args.repeat, lambda: da.analyze(
                    base, tuned, intruders=True, svd_cache=str(cache))),
                "LoRA spectrum": best_of(args.repeat, lambda: da.analyze(base, adapter,
                                                                         spectrum=True)),
            }
        if not args.skip_new:
            rows |= new_options(base, tuned, adapter, root, args.size, args.rank, args.repeat)
    plain, lora = rows["plain"], rows["LoRA plain"]
    print(f"one {args.size} × {args.size} fp32 matrix, {torch.get_num_threads()} threads, "
          f"best of {args.repeat}")
    print(f"{'analysis':<18}{'seconds':>10}{'× plain':>10}")
    for label, seconds in rows.items():
        ref = lora if label.startswith("LoRA") else plain
        print(f"{label:<18}{seconds:>10.2f}{seconds / ref:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
