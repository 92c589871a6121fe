"""``dora-analyze``: the command line, a thin shell over :func:`dora_analysis.analyze` (SPEC §5).

Exit codes: 0 success, 2 bad input or usage (one ``error: …`` line on stderr), 130 interrupted
(143 terminated). The console script enters through :func:`dora_analysis.console.analyze`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from . import __version__
from . import metrics as registry
from .config import (
    AXIS_CHOICES,
    METHOD_CHOICES,
    N_BOOT,
    PRECISIONS,
    AnalysisConfig,
)
from .console import interrupted, parser, printable, say
from .errors import (
    AdapterWarning,
    DoraAnalysisError,
    NonFiniteWeightWarning,
    SkippedFoldersWarning,
    UnmatchedTensorsWarning,
    VanishedCheckpointWarning,
)
from .hardware import usable_cpus
from .io.guard import IO_BACKENDS, path_kind
from .metrics.base import CROSS_RUN_K, CROSS_RUN_TRIM

# Only light modules above: --help and argument errors answer without importing torch, pandas,
# scipy or plotly; run() imports the analysis when there is work to do.
DEFAULTS = AnalysisConfig()

EPILOG = """\
examples:
  dora-analyze pre.safetensors tuned.safetensors -o deltas.csv
  dora-analyze base/ runs/ft runs/lora --label FT LoRA --modules q,v --summary corr.csv
  dora-analyze base/ runs/dora/checkpoint-100 runs/dora/checkpoint-200 --method dora
  dora-analyze meta-llama/Llama-2-7b-hf some-org/llama2-dora-adapter@main

A folder holding checkpoint-N/ or step-N/ subfolders is read as a training series (step = N).
PyTorch DCP folders (.metadata + *.distcp; FSDP checkpoint-N/pytorch_model_fsdp_0/, torchtitan
step-N/) and DeepSpeed ZeRO folders (global_stepN/, or one with a 'latest' file) are read too.
PEFT adapter folders (and torchtune, LyCORIS/kohya, official DoRA adapters) are merged with
BASE as they are read. org/name[@revision] is a Hugging Face Hub repo (a local path wins).
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        prog="dora-analyze",
        description="Magnitude and direction changes (ΔM, ΔD; DoRA paper Eqs. 2-4) of fine-tuned "
        "weights against their base, per layer and step, and their correlation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", metavar="BASE", help="pre-trained checkpoint (file or folder)")
    p.add_argument("tuned", metavar="TUNED", nargs="+",
                   help="tuned checkpoint(s): files, folders, or folders of checkpoint-N/")
    p.add_argument("--label", action="extend", nargs="+", metavar="NAME",
                   help="label per TUNED (default: derived from the path)")
    p.add_argument("--method", action="extend", nargs="+", choices=METHOD_CHOICES,
                   help="fine-tuning method, once for all or once per TUNED (default: auto)")
    p.add_argument("--modules", metavar="KINDS",
                   help="comma-separated modules to keep: kinds (q,k,v,o,gate,up,down,qkv,"
                   "lm_head …) or the modules' own names (q_proj, query, mlp.down_proj); an "
                   "entry that matches no module of BASE is an error")
    p.add_argument("--include", metavar="REGEX", help="keep parameter names matching REGEX")
    p.add_argument("--axis", choices=tuple(AXIS_CHOICES), default=DEFAULTS.axis,
                   help="vectors per output channel (out, default, as PEFT), per input feature "
                   "(in), or both")
    p.add_argument("--skip-mismatched", action="store_true",
                   help="skip tensors whose shapes differ (e.g. resized embeddings) with a "
                   "warning instead of failing")
    p.add_argument("--skip-vanished", action="store_true",
                   help="leave out, with a warning, tuned checkpoints deleted while they are read "
                   "(a trainer's save_total_limit rotation) instead of stopping")
    p.add_argument("--io", choices=IO_BACKENDS, default=DEFAULTS.io,
                   help="read safetensors memory-mapped (default: no copy; RSS also counts the "
                   "page cache read) or with pread into reused buffers (RSS shows only the "
                   "working set)")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision,
                   help="auto (default): weights as stored for inference (DeepSpeed ZeRO-3 keeps "
                   "none: its fp32 masters, with a note); fp32: DeepSpeed ZeRO's fp32 master "
                   "weights, rebuilt from the optimizer partitions (finer than bf16). The dtype "
                   "column says what was read; other formats are read as stored")
    p.add_argument("--lora-alpha", type=float, metavar="ALPHA",
                   help="alpha of adapters that do not store it (torchtune)")
    p.add_argument("--adapter-base", metavar="REF",
                   help="the base adapters were trained against when it is not BASE (PiSSA/OLoRA/"
                   "CorDA residual, LoftQ quantized weights): merged into it, measured against "
                   "BASE")
    p.add_argument("--materialize", action="store_true",
                   help="merge adapters by forming B·A block by block instead of the closed form "
                   "(same numbers, slower; for checking)")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="threads computing tensors at once (default: every usable core, "
                   f"{usable_cpus()} here); the table does not depend on it")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on a Dask cluster (tcp://HOST:8786); its workers read the "
                   "checkpoints by the same paths (needs dora-analysis[dask])")
    p.add_argument("--token", metavar="TOKEN",
                   help="Hugging Face token for private or gated repos (default: HF_TOKEN)")
    add_metric_options(p)
    add_cache_options(p)
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the table: .csv, .json or .parquet")
    p.add_argument("--summary", metavar="FILE",
                   help="write the correlation table: .csv, .json or .parquet")
    p.add_argument("--n-boot", type=int, default=N_BOOT, metavar="N",
                   help="bootstrap resamples over layers for the 95%% interval of r "
                   "(default %(default)s; 0: none)")
    p.add_argument("--html", metavar="FILE",
                   help="write a self-contained HTML report (Figures 2 and 3, tables)")
    group = p.add_argument_group("cross-run similarity (two TUNED runs or more)")
    group.add_argument("--cross-run", metavar="FILE",
                       help="also compare the TUNED runs with each other (a series: its last "
                       "step): one row per pair of runs and matrix with update_cosine, "
                       "subspace_similarity, sign_conflict, mask_jaccard, written to FILE (.csv, "
                       ".json or .parquet); --html then draws their heatmaps")
    group.add_argument("--cross-run-k", type=_positive_int, default=CROSS_RUN_K, metavar="K",
                       help="subspace_similarity over the top K left singular vectors of ΔW "
                       "(default %(default)s; clamped to the rank, with a note)")
    group.add_argument("--cross-run-trim", type=float, default=CROSS_RUN_TRIM, metavar="T",
                       help="sign_conflict keeps each ΔW's top T share by magnitude, as TIES "
                       "(default %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or file messages")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """``--cache DIR``, ``--no-cache`` and ``--clear-cache`` (the results cache)."""
    group = parser.add_argument_group(
        "results cache (a run stopped midway and started again computes only what is missing)")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--cache", metavar="DIR",
                       help="the cache folder (default: $XDG_CACHE_HOME/dora-analysis or "
                       "~/.cache/dora-analysis)")
    where.add_argument("--no-cache", action="store_true",
                       help="neither read nor write the results cache")
    group.add_argument("--clear-cache", action="store_true",
                       help="empty the results cache first (alone, without BASE and TUNED: "
                       "only that)")


def clear_cache(folder: str | None, quiet: bool) -> None:
    """Empty the results cache in ``folder`` (default location when None), saying what went."""
    from .cache.results import cache_folder, clear

    where = cache_folder(folder or True)
    held, entries = clear(where)
    if not quiet:
        say(f"cleared the results cache {printable(str(where))}: {entries} entries "
            f"({held / (1 << 20):.1f} MiB)")


def clear_cache_only(argv: list[str]) -> bool:
    """``dora-analyze --clear-cache [--cache DIR] [-q]``, without checkpoints: clear, and say
    so (True); False when there is an analysis to run."""
    if "--clear-cache" not in argv:
        return False
    alone = argparse.ArgumentParser(add_help=False)
    alone.add_argument("--clear-cache", action="store_true")
    alone.add_argument("--cache")
    alone.add_argument("-q", "--quiet", action="store_true")
    args, rest = alone.parse_known_args(argv)
    if rest:
        return False
    clear_cache(args.cache, args.quiet)
    return True


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def add_metric_options(parser: argparse.ArgumentParser) -> None:
    """One switch per optional metric and one option per metric setting, from the registry."""
    group = parser.add_argument_group("metrics (beyond ΔM, ΔD and tangential_fraction)")
    for option, metric in registry.options().items():
        group.add_argument(f"--{option.replace('_', '-')}", dest=f"metric_{option}",
                           action="store_true",
                           help=f"{metric.description} (cost: {registry.COSTS[metric.cost]})")
    for name, setting in registry.settings().items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}",
                           type=setting.type, metavar="VALUE",
                           help=f"{setting.help} (default: {setting.default})")


def metric_config(args: argparse.Namespace) -> dict:
    """The ``metrics`` and ``metric_settings`` of :class:`AnalysisConfig` from parsed options."""
    switches = tuple(o for o in registry.options() if getattr(args, f"metric_{o}", False))
    values = tuple((n, getattr(args, f"setting_{n}")) for n in registry.settings()
                   if getattr(args, f"setting_{n}", None) is not None)
    return {"metrics": switches, "metric_settings": values}


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    say(f"warning: {message}")


def run(args: argparse.Namespace) -> int:
    """Carry out one parsed command; raises :class:`DoraAnalysisError` on bad input."""
    if args.n_boot < 0:
        raise DoraAnalysisError(f"--n-boot must be 0 or more, got {args.n_boot}")
    from .analysis import import_modules, plan, to_frame
    from .analysis import run as compute
    from .report import check_outputs

    given = (args.base, *args.tuned, args.adapter_base)
    inputs = [Path(a) for a in given if a is not None and path_kind(a) is not None]
    outputs = {"output": args.output, "summary": args.summary, "html": args.html,
               "cross_run": args.cross_run}
    if args.cross_run:
        from .crossrun import check_settings

        check_settings(args.tuned, args.cross_run_k, args.cross_run_trim)
    check_outputs(**outputs, inputs=inputs)  # before any work
    if args.clear_cache:
        clear_cache(args.cache, args.quiet)
    cache = None if args.no_cache else (args.cache or True)
    config = AnalysisConfig(
        axis=args.axis,
        modules=args.modules,  # one comma-separated string, split by the config
        include=args.include,
        skip_mismatched=args.skip_mismatched,
        skip_vanished=args.skip_vanished,
        progress=not args.quiet and sys.stderr.isatty(),
        closed_form=not args.materialize,
        io=args.io,
        lora_alpha=args.lora_alpha,
        precision=args.precision,
        token=args.token,
        adapter_base=args.adapter_base,
        workers=args.workers,
        **metric_config(args),
    )
    work = plan(args.base, args.tuned, labels=args.label, methods=args.method, config=config)
    # what comes after the analysis is imported while the workers compute
    meanwhile = import_modules("pandas", "scipy.special", f"{__package__}.stats",
                               f"{__package__}.report")
    if args.scheduler:
        from .integrations.dask import connect

        with connect(args.scheduler) as client:
            table = to_frame(compute(work, client, cache, meanwhile=meanwhile), config)
    else:
        table = to_frame(compute(work, None, cache, meanwhile=meanwhile), config)
    from .report import format_summary, write_outputs
    from .stats import correlate

    correlations = correlate(table, n_boot=args.n_boot)
    cross = None
    if args.cross_run:
        from .crossrun import compare_runs

        cross = compare_runs(args.base, args.tuned, labels=args.label, k=args.cross_run_k,
                             trim=args.cross_run_trim, config=config)
    write_outputs(table, correlations, **outputs, inputs=inputs,  # all of them, or none
                  cross_run_table=cross)
    if not args.quiet:
        for path, what in ((args.output, f"{len(table)} rows"),
                           (args.summary, f"{len(correlations)} rows"), (args.html, "report"),
                           (args.cross_run, f"{0 if cross is None else len(cross)} rows")):
            if path:
                say(f"wrote {path} ({what})")
    sys.stdout.write(printable(format_summary(table, correlations)))
    return 0


class _NoteHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        say(f"note: {record.getMessage()}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dora-analyze``."""
    try:
        if clear_cache_only(sys.argv[1:] if argv is None else list(argv)):
            return 0
    except DoraAnalysisError as exc:
        say(f"error: {exc}")
        return 2
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("dora_analysis")
    handler = _NoteHandler()
    if not args.quiet:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library deprecation noise is not the user's business
            for category in (NonFiniteWeightWarning, UnmatchedTensorsWarning, AdapterWarning,
                             SkippedFoldersWarning, VanishedCheckpointWarning):
                warnings.simplefilter("always", category)
            warnings.showwarning = _print_warning
            return run(args)
    except DoraAnalysisError as exc:
        say(f"error: {exc}")
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM/SIGHUP through the console entry
        return interrupted(exc)
    except BrokenPipeError:
        return 0
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
