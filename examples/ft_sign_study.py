"""Why is full fine-tuning's ΔD–ΔM correlation positive on MiniLM when the DoRA paper's is −0.62?

Reads the runs of ``reproduce_figure2.py`` (one folder per setting, e.g. the DoRA authors'
optimiser settings and a control), analyses every module kind FT trains (q, k, v, o, up, down)
with the spectral metrics, and separates three things the pooled r of Figure 2 mixes:

* the correlation's sources — pooled r, the within-step r (across layers at one step), the
  within-layer r (across steps), the partial r given the step, the 95 % bootstrap interval over
  layers (``dora_analysis.correlate``);
* what ΔM is made of — per vector, ``Δw`` splits into a radial part ``a`` (along ``w0``) and a
  tangential part ``t``; the norm changes by ``√((ρ + a)² + t²) − ρ ≈ a + t²/(2ρ)``: a first-order
  radial term and a second-order "mechanical" term that any sideways step brings (``t²/(2ρ) ≈
  ρ·(1 − cos)``, so it is tied to ΔD by construction): the table's ``delta_m_radial`` and
  ``delta_m_sideways``, ΔM had the step been only radial or only sideways;
* where — module kinds, layers, steps.

    python examples/ft_sign_study.py reproduction-ft/authors reproduction-ft/control \\
        --labels "authors' settings" "control" --docs docs/reproduction/ft-sign

Writes ``table.csv`` (every matrix × step × run), ``correlations.csv``, ``summary.csv`` and
``summary.md`` (per setting × method × module, over seeds), and PNG figures (with ``--docs``;
needs kaleido).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import dora_analysis as da
from dora_analysis.plots import figure2, figure3
from dora_analysis.stats import pearson_r

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_figure2 import minilm_dir, spread  # noqa: E402

MODULES = ("q", "k", "v", "o", "up", "down")
DIAGNOSTICS = ("pearson_r", "within_step_r", "within_layer_r", "partial_r", "r_ci_low",
               "r_ci_high")


def runs_of(folder: Path) -> dict[str, Path]:
    """``method-seedN`` → run folder (a series of checkpoint-N) under ``folder/runs``."""
    return {p.name: p for p in sorted((folder / "runs").iterdir())
            if p.is_dir() and any(p.glob("checkpoint-*"))}


def analyse(folders: list[Path], labels: list[str],
            baseline: tuple[Path, str] | None = None) -> pd.DataFrame:
    """Every run of every folder analysed, plus (``baseline``) a table saved earlier, e.g. the
    committed 5-seed experiment of docs/reproduction.md (q and v only, fewer columns)."""
    base = minilm_dir() / "model.safetensors"
    frames = []
    if baseline is not None:
        table = da.read_table(baseline[0])
        table["setting"] = baseline[1]
        table["seed"] = table["checkpoint"].str.extract(r"seed(\d+)$", expand=False).astype(int)
        frames.append(table)
    for folder, setting in zip(folders, labels, strict=True):
        runs = runs_of(folder)
        table = da.analyze(base, list(runs.values()), labels=list(runs),
                           methods=[name.split("-")[0] for name in runs], modules=MODULES,
                           spectrum=True)
        table["setting"] = setting
        table["seed"] = table["checkpoint"].str.extract(r"seed(\d+)$", expand=False).astype(int)
        frames.append(table)
    table = pd.concat(frames, ignore_index=True)
    # An update direction uncorrelated with w0 (n = vector length) has a radial part a ~ N(0,
    # ‖Δw‖²/n), so E|a| = ‖Δw‖·√(2/(πn)), while ΔD ≈ ‖Δw‖²/(2ρ²): ΔM ≈ ρ·√(4ΔD/(πn)) follows from
    # ΔD alone. "iso_dm" is that prediction; ΔM / iso_dm ≈ 1 says the norms changed only as much
    # as a random direction of the same size changes them.
    table["iso_dm"] = table["mean_m0"] * np.sqrt(4 * table["delta_d"] / (np.pi * table["cols"]))
    # The radial share of ‖Δw‖² a direction uncorrelated with w0 would have is 1/n (n = vector
    # length): this ratio is 1 for such "isotropic" updates, above 1 when rows were rescaled.
    if "tangential_fraction" in table:
        table["radial_excess"] = (1 - table["tangential_fraction"]) * table["cols"]
    return table


def correlations_of(table: pd.DataFrame) -> pd.DataFrame:
    """``da.correlate`` per setting, plus ``iso_r``: Pearson r of ΔM with the isotropic
    prediction ``iso_dm`` over the same points (1 = ΔM is a function of ΔD and the row norms)."""
    frames = []
    for setting, part in table.groupby("setting", sort=False):
        corr = da.correlate(part)
        if "iso_dm" in part:
            iso = {key: pearson_r(g["iso_dm"].to_numpy(float), g["delta_m"].to_numpy(float))
                   for key, g in part.groupby(["checkpoint", "module", "axis"], sort=False)}
            corr["iso_r"] = [iso.get((c, m, a), float("nan")) for c, m, a in
                             zip(corr["checkpoint"], corr["module"], corr["axis"], strict=True)]
        corr["setting"] = setting
        corr["seed"] = corr["checkpoint"].str.extract(r"seed(\d+)$", expand=False).astype(int)
        frames.append(corr)
    return pd.concat(frames, ignore_index=True)


def summary(table: pd.DataFrame, corr: pd.DataFrame) -> pd.DataFrame:
    """Per setting × method × module: the diagnostics over seeds, and at the last step the
    tangential fraction and the radial/mechanical shares of ΔM."""
    last = table[table["step"] == table.groupby("checkpoint")["step"].transform("max")]
    rows = []
    for (setting, method, module), g in corr.groupby(["setting", "method", "module"],
                                                     sort=False):
        row = {"setting": setting, "method": method, "module": module, "seeds": len(g),
               "negative_seeds": int((g["pearson_r"] < 0).sum())}
        for col in (*DIAGNOSTICS, "iso_r"):
            if col in g:
                s = spread(g[col])
                row |= {f"{col}_mean": s["mean"], f"{col}_std": s["std"]}
        sel = last[(last["setting"] == setting) & (last["method"] == method)
                   & (last["module"] == module)]
        row |= {"delta_d": sel["delta_d"].mean(), "delta_m": sel["delta_m"].mean(),
                "relative_dm": (sel["delta_m"] / sel["mean_m0"]).mean()}
        for col in ("tangential_fraction", "effective_rank", "energy_rank_90"):
            row[col] = sel[col].astype(float).mean() if col in sel else float("nan")
        row |= {"radial_share": (sel["delta_m_radial"] / sel["delta_m"]).mean()
                if "delta_m_radial" in sel else float("nan"),
                "sideways_share": (sel["delta_m_sideways"] / sel["delta_m"]).mean()
                if "delta_m_sideways" in sel else float("nan"),
                "radial_excess": sel["radial_excess"].mean() if "radial_excess" in sel
                else float("nan"),
                "dm_over_iso": (sel["delta_m"] / sel["iso_dm"]).mean() if "iso_dm" in sel
                else float("nan")}
        rows.append(row)
    return pd.DataFrame(rows)


def pm(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:+.2f}" if pd.isna(std) else f"{mean:+.2f} ± {std:.2f}"


def num(value: float, spec: str) -> str:
    return "–" if pd.isna(value) else format(value, spec)


def markdown(summ: pd.DataFrame) -> str:
    lines = ["| setting | method | module | pooled r | within-step r | within-layer r | "
             "partial r | 95 % CI (mean) | r < 0 | tangential fraction | radial excess | "
             "ΔM radial / ΔM | ΔM sideways / ΔM | ΔM / isotropic ΔM | r(ΔM, isotropic ΔM) | "
             "ΔD, last step | effective rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summ.to_dict("records"):
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['module']} "
            f"| {pm(r['pearson_r_mean'], r['pearson_r_std'])} "
            f"| {pm(r['within_step_r_mean'], r['within_step_r_std'])} "
            f"| {pm(r['within_layer_r_mean'], r['within_layer_r_std'])} "
            f"| {pm(r['partial_r_mean'], r['partial_r_std'])} "
            f"| [{r['r_ci_low_mean']:+.2f}, {r['r_ci_high_mean']:+.2f}] "
            f"| {r['negative_seeds']}/{r['seeds']} | {num(r['tangential_fraction'], '.4f')} "
            f"| {num(r['radial_excess'], '.2f')} | {num(r['radial_share'], '.2f')} "
            f"| {num(r['sideways_share'], '.2f')} | {num(r['dm_over_iso'], '.2f')} "
            f"| {pm(r.get('iso_r_mean', float('nan')), r.get('iso_r_std', float('nan')))} "
            f"| {r['delta_d']:.1e} "
            f"| {num(r['effective_rank'], '.0f')} |")
    return "\n".join(lines) + "\n"


def diagnostics_figure(summ: pd.DataFrame, method: str = "ft") -> go.Figure:
    """Pooled, within-step, within-layer and partial r per module kind and setting (FT)."""
    part = summ[summ["method"] == method]
    settings = list(dict.fromkeys(part["setting"]))
    fig = make_subplots(rows=1, cols=len(settings), shared_yaxes=True,
                        subplot_titles=[f"{method.upper()}: {s}" for s in settings])
    colours = {"pearson_r": "#1f77b4", "within_step_r": "#d62728", "within_layer_r": "#2ca02c",
               "partial_r": "#9467bd"}
    for i, setting in enumerate(settings, start=1):
        rows = part[part["setting"] == setting]
        for col, colour in colours.items():
            fig.add_trace(go.Bar(x=rows["module"], y=rows[f"{col}_mean"],
                                 error_y={"type": "data", "array": rows[f"{col}_std"].fillna(0)},
                                 name=col, marker_color=colour, showlegend=i == 1), row=1, col=i)
    fig.add_hline(y=-0.62, line={"dash": "dot", "color": "black"},
                  annotation_text="paper FT (q): −0.62")
    fig.update_yaxes(range=[-1.05, 1.05], title_text="r (mean ± std over seeds)", col=1)
    fig.update_layout(barmode="group", template="plotly_white", height=430,
                      width=520 * len(settings), title="Where is FT's correlation from?")
    return fig


def mechanical_figure(table: pd.DataFrame) -> go.Figure:
    """Per matrix at every step: ΔM against what the sideways part alone (left) and the radial
    part alone (right) would cause; on the diagonal, that part is all of ΔM."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=["ΔM vs ΔM of the sideways part alone (≈ ρ·ΔD)",
                                        "ΔM vs ΔM of the radial part alone"])
    colours = {"ft": "#1f77b4", "lora": "#d62728", "dora": "#2ca02c"}
    symbols = ("circle", "x", "diamond", "square")
    table = table.dropna(subset=["delta_m_sideways", "delta_m_radial"])  # older tables lack them
    settings = list(dict.fromkeys(table["setting"]))
    for col, part in enumerate(("delta_m_sideways", "delta_m_radial"), start=1):
        for (setting, method), g in table.groupby(["setting", "method"], sort=False):
            fig.add_trace(go.Scatter(
                x=g[part], y=g["delta_m"], mode="markers", name=f"{method} · {setting}",
                legendgroup=f"{method}{setting}", showlegend=col == 1,
                marker={"color": colours.get(method, "#777"), "size": 5, "opacity": 0.6,
                        "symbol": symbols[settings.index(setting) % len(symbols)]}), row=1,
                col=col)
        lo = float(table[["delta_m", part]].min().min())
        hi = float(table[["delta_m", part]].max().max())
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", showlegend=False,
                                 line={"dash": "dash", "color": "black"}), row=1, col=col)
        fig.update_xaxes(type="log", exponentformat="e", row=1, col=col, title_text=part)
    fig.update_yaxes(type="log", exponentformat="e")
    fig.update_yaxes(title_text="ΔM", col=1)
    fig.update_layout(template="plotly_white", height=480, width=1200,
                      title="What ΔM is made of (every matrix and step)")
    return fig


def write_png(fig: go.Figure, path: Path) -> None:
    fig.write_image(path, width=fig.layout.width or 1200, height=fig.layout.height or 450)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path,
                        help="output folders of reproduce_figure2.py (one per setting)")
    parser.add_argument("--labels", nargs="+", help="a name per folder (default: folder name)")
    parser.add_argument("--baseline", type=Path,
                        help="a table saved earlier to compare with (docs/reproduction/table.csv)")
    parser.add_argument("--baseline-label", default="baseline")
    parser.add_argument("--out", type=Path, default=Path("reproduction-ft/study"))
    parser.add_argument("--docs", type=Path, help="also write the PNG figures and copies here")
    args = parser.parse_args(argv)
    labels = args.labels or [f.name for f in args.folders]
    if len(labels) != len(args.folders):
        parser.error("give one --labels entry per folder")
    args.out.mkdir(parents=True, exist_ok=True)
    table = analyse(args.folders, labels,
                    (args.baseline, args.baseline_label) if args.baseline else None)
    corr = correlations_of(table)
    summ = summary(table, corr)
    files = {"table.csv": table, "correlations.csv": corr, "summary.csv": summ}
    for name, frame in files.items():
        da.write_table(frame, args.out / name)
    text = markdown(summ)
    (args.out / "summary.md").write_text(text)
    print(text)
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        for name in ("table.csv", "correlations.csv", "summary.csv"):
            da.write_table(files[name], args.docs / name)
        (args.docs / "summary.md").write_text(text)
        first = labels[0]
        ft0 = table[(table["setting"] == first) & (table["checkpoint"] == "ft-seed0")]
        write_png(figure2(ft0, module="q"), args.docs / "figure2_ft_query.png")
        write_png(diagnostics_figure(summ), args.docs / "diagnostics_ft.png")
        write_png(mechanical_figure(table), args.docs / "mechanical.png")
        seed0 = table[(table["setting"] == first) & (table["seed"] == 0)]
        fig3 = figure3(seed0, modules=("q", "v", "up"), log_y=True)
        fig3.update_layout(width=1200)
        write_png(fig3, args.docs / "figure3_log.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
