"""Update sparsity (fp32 vs bf16 storage) and cross-run similarity of the reproduction's runs.

Reads the runs ``examples/reproduce_figure2.py`` kept (``OUT/runs/{ft,lora,dora}-seedN/``, each a
series of ``checkpoint-N/``) and measures, with the public API only:

1. **Update sparsity, as stored in fp32 and in bf16** (``--sparsity``; Mukherjee et al. 2025,
   arXiv 2505.11711; "The Path Not Taken", arXiv 2511.08567): every checkpoint of every run
   against the pre-trained MiniLM, once with the weights as trained and saved (fp32), once with
   the same weights stored as bf16 — the base and the FT checkpoints rounded to bf16 (written to
   ``OUT/bf16/``), the adapters merged and rounded to the bf16 base as ``merge_and_unload``
   stores them.
2. **Cross-run similarity** (``compare_runs``) of the last checkpoints of all runs: the 10 pairs of
   seeds within each method, and the pairs across methods.

    python examples/update_study.py --out reproduction                      # tables in OUT/study
    python examples/update_study.py --out reproduction --docs docs/reproduction   # + figures

Writes ``sparsity.csv`` (one row per run, step, matrix and storage), ``sparsity_summary.csv``,
``cross_run.csv``, ``cross_run_summary.csv`` and ``study.md`` (the numbers docs/reproduction.md
quotes); with ``--docs`` also copies them there with PNG figures.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from safetensors.torch import load_file, save_file

import dora_analysis as da
from dora_analysis.heatmaps import cross_run_overview

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_figure2 import METHODS, minilm_dir  # noqa: E402

SPARSITY = ["unchanged_fraction", "unchanged_fraction_tol", "unchanged_rows", "median_ulps"]
MEASURES = ["update_cosine", "subspace_similarity", "sign_conflict", "mask_jaccard"]
RUN = re.compile(r"^(ft|lora|dora)-seed(\d+)$")
LABELS = {"ft": "FT", "lora": "LoRA", "dora": "DoRA"}


def find_runs(folder: Path) -> dict[str, Path]:
    """``{method}-seed{N}`` → run folder for the finished runs (reproduce_figure2.py writes
    ``command.json`` when a run is done), FT, LoRA, DoRA, each by seed."""
    done = [p for p in folder.iterdir() if RUN.match(p.name) and (p / "command.json").is_file()]
    order = {m: i for i, m in enumerate(METHODS)}
    done.sort(key=lambda p: (order[RUN.match(p.name).group(1)], int(RUN.match(p.name).group(2))))
    runs = {p.name: p for p in done}
    if not runs:
        sys.exit(f"error: no finished runs in {folder}; run examples/reproduce_figure2.py first")
    return runs


def to_bf16(source: Path, target: Path) -> Path:
    """The same checkpoint with every float tensor rounded to bf16 (round to nearest even)."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tensors = load_file(str(source))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                   for k, v in tensors.items()}, str(target))
    return target


def bf16_run(run: Path, folder: Path) -> Path:
    """A run as bf16: FT's checkpoints rounded (a series folder again); an adapter as it is
    (merged with the bf16 base, the merged weight is rounded to bf16)."""
    if not run.name.startswith("ft"):
        return run
    for ckpt in sorted(run.glob("checkpoint-*")):
        to_bf16(ckpt / "model.safetensors", folder / run.name / ckpt.name / "model.safetensors")
    return folder / run.name


def sparsity_table(runs: dict[str, Path], bf16_folder: Path) -> pd.DataFrame:
    """--sparsity of every checkpoint, stored fp32 and bf16, query and value matrices."""
    base = minilm_dir() / "model.safetensors"
    base16 = to_bf16(base, bf16_folder / "base.safetensors")
    frames = []
    for storage, base_ref, refs in (("fp32", base, list(runs.values())),
                                    ("bf16", base16, [bf16_run(r, bf16_folder)
                                                      for r in runs.values()])):
        table = da.analyze(base_ref, refs, labels=list(runs), modules="q,v", sparsity=True,
                           methods=[RUN.match(n).group(1) for n in runs])
        frames.append(table.assign(storage=storage))
    table = pd.concat(frames, ignore_index=True)
    table["seed"] = table["checkpoint"].str.extract(r"seed(\d+)$", expand=False).astype(int)
    return table


def sparsity_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per method, storage and step: the mean over matrices and seeds of each column (and its
    spread over seeds)."""
    per_run = (table.groupby(["method", "storage", "step", "seed"], sort=False)[SPARSITY]
               .mean().reset_index())
    grouped = per_run.groupby(["method", "storage", "step"], sort=False)
    summary = grouped[SPARSITY].mean()
    summary = summary.join(grouped[SPARSITY].std(ddof=1).add_suffix("_std"))
    summary["seeds"] = grouped.size()
    return summary.reset_index()


def cross_run_table(runs: dict[str, Path]) -> pd.DataFrame:
    """compare_runs on the last checkpoints of every run (query and value matrices)."""
    base = minilm_dir() / "model.safetensors"
    return da.compare_runs(base, list(runs.values()), labels=list(runs), modules="q,v", k=16)


def pair_kind(a: str, b: str) -> str:
    """Same method, other seed; or two methods, of one seed (the same batches and adapter
    initialisation) or of two — the seed, not only the method, decides how alike they are."""
    (ma, sa), (mb, sb) = RUN.match(a).groups(), RUN.match(b).groups()
    if ma == mb:
        return f"{LABELS[ma]} vs {LABELS[ma]} (seeds)"
    return f"{LABELS[ma]} vs {LABELS[mb]} ({'same seed' if sa == sb else 'other seeds'})"


def cross_run_summary(cross: pd.DataFrame) -> pd.DataFrame:
    """Per kind of pair (same method, other seed; or two methods) and module: mean ± std over
    the pairs of the per-pair mean over layers."""
    cross = cross.assign(pair=[pair_kind(a, b) for a, b in zip(cross.run_a, cross.run_b,
                                                               strict=True)])
    per_pair = cross.groupby(["pair", "module", "run_a", "run_b"], sort=False)[MEASURES].mean()
    grouped = per_pair.groupby(level=["pair", "module"], sort=False)
    summary = grouped.mean().join(grouped.std(ddof=1).add_suffix("_std"))
    summary["pairs"] = grouped.size()
    return summary.reset_index()


def fmt(value: float, std: float | None = None, digits: int = 3) -> str:
    text = f"{value:.{digits}f}"
    return text if std is None or pd.isna(std) else f"{text} ± {std:.{digits}f}"


def markdown(summary: pd.DataFrame, cross: pd.DataFrame, last_step: int) -> str:
    final = summary[summary.step == last_step]
    lines = ["| method | storage | unchanged (bitwise) | \\|Δ\\| ≤ 1e-5 | whole rows unchanged "
             "| median ulps of a change | seeds |", "|---|---|---|---|---|---|---|"]
    for r in final.itertuples():
        lines.append(f"| {LABELS[r.method]} | {r.storage} "
                     f"| {fmt(r.unchanged_fraction, r.unchanged_fraction_std)} "
                     f"| {fmt(r.unchanged_fraction_tol, r.unchanged_fraction_tol_std)} "
                     f"| {fmt(r.unchanged_rows, r.unchanged_rows_std)} "
                     f"| {fmt(r.median_ulps, r.median_ulps_std, 1)} | {r.seeds} |")
    lines += ["", "| pair of runs | module | update cosine | subspace similarity (k = 16) "
              "| sign conflict (top 20 %) | Jaccard of changed weights | pairs |",
              "|---|---|---|---|---|---|---|"]
    for r in cross.itertuples():
        lines.append(f"| {r.pair} | {r.module} "
                     + " ".join(f"| {fmt(getattr(r, m), getattr(r, m + '_std'))}"
                                for m in MEASURES) + f" | {r.pairs} |")
    return "\n".join(lines) + "\n"


def sparsity_figure(summary: pd.DataFrame) -> go.Figure:
    """Per step, fp32 (dotted) vs bf16 (solid), one colour per method: the share of weights
    bitwise unchanged, and the median size of a change in ulps of the base weight."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "share of weights bitwise unchanged", "median |Δ| of a changed weight, in ulps"))
    colours = {"ft": "#1f77b4", "lora": "#d62728", "dora": "#2ca02c"}
    for (method, storage), rows in summary.groupby(["method", "storage"], sort=False):
        line = {"color": colours[method], "dash": "dot" if storage == "fp32" else "solid"}
        for col, column in enumerate(("unchanged_fraction", "median_ulps"), start=1):
            fig.add_trace(go.Scatter(
                x=rows["step"], y=rows[column], mode="lines+markers", line=line,
                name=f"{LABELS[method]}, {storage}", legendgroup=f"{method}{storage}",
                showlegend=col == 1,
                error_y={"type": "data", "array": rows[f"{column}_std"].fillna(0)}),
                row=1, col=col)
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_yaxes(type="log", exponentformat="power", row=1, col=2)
    fig.update_layout(title="Query and value weights of the MiniLM runs (mean over seeds)",
                      template="plotly_white", width=1100, height=450)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reproduction"),
                        help="the folder of reproduce_figure2.py (its runs/ are read)")
    parser.add_argument("--docs", type=Path, help="also copy the tables and write PNG figures")
    args = parser.parse_args(argv)
    runs = find_runs(args.out / "runs")
    study = args.out / "study"
    study.mkdir(parents=True, exist_ok=True)
    print(f"{len(runs)} runs: {', '.join(runs)}")
    table = sparsity_table(runs, args.out / "bf16")
    summary = sparsity_summary(table)
    cross = cross_run_table(runs)
    cross_summary = cross_run_summary(cross)
    outputs = {"sparsity.csv": table, "sparsity_summary.csv": summary, "cross_run.csv": cross,
               "cross_run_summary.csv": cross_summary}
    for name, frame in outputs.items():
        da.write_table(frame, study / name)
    text = markdown(summary, cross_summary, int(table["step"].max()))
    (study / "study.md").write_text(text)
    print(text)
    if args.docs:
        target = args.docs / "study"
        target.mkdir(parents=True, exist_ok=True)
        for name in (*outputs, "study.md"):
            shutil.copyfile(study / name, target / name)
        figures = {"sparsity_by_step": sparsity_figure(summary),
                   **{f"cross_run_{m}": cross_run_overview(cross, m) for m in MEASURES}}
        for name, fig in figures.items():
            fig.write_image(target / f"{name}.png", width=fig.layout.width or 900,
                            height=fig.layout.height or 600, scale=1)
            print(f"wrote {target / f'{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
