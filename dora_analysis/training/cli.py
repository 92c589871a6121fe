"""``dora-train``: fine-tune a ``transformers`` model with FT, LoRA or DoRA and save a checkpoint
series that ``dora-analyze`` reads. A thin shell: data in :mod:`.data`, tasks in :mod:`.tasks`,
the loop in :mod:`.loop`, devices and ``torchrun`` in :mod:`.runtime` and :mod:`.distributed`.

Nothing heavy is imported before ``run``: ``dora-train --help`` answers without torch.

Exit codes: 0 success, 2 bad input (one ``error: …`` line on stderr), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM), 129 hung up (SIGHUP).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..errors import (
    ConfigError,
    DoraAnalysisError,
    ResumeWarning,
    RunFolderWarning,
    TruncationWarning,
)
from ..exits import interrupted, parser
from .checks import check_arguments, check_model
from .config import DEVICES, DTYPES, METHODS, PARALLEL, TASKS, TrainConfig, canonical_dtype

DESCRIPTION = """\
Fine-tune a transformers model with full fine-tuning (ft), LoRA or DoRA and save a series of
checkpoints (OUTPUT/checkpoint-N/) that dora-analyze reads: full weights for ft, PEFT adapter
folders for lora and dora."""

EPILOG = """\
tasks:
  seq-cls    sequence classification; --data is .jsonl or .csv with a text and a label field
  causal-lm  next-token prediction; --data is .jsonl, each line one of
               {"prompt": ..., "response": ...}   loss on the response only
               {"messages": [{"role": ..., "content": ...}, ...]}
                                                  chat template of the tokenizer (else plain
                                                  "role: content" lines); loss on assistant turns
               {"text": ...}                      loss on every token
             examples longer than --max-length are truncated, with a warning

examples:
  dora-train --model bert-base-uncased --data train.jsonl --method dora --output runs/dora
  dora-train --task causal-lm --model path/to/llama --data chat.jsonl --method lora \\
             --targets q_proj,k_proj,v_proj,o_proj --device cuda --gradient-checkpointing \\
             --steps 500 --save-steps 100,200,300,400 --output runs/lora
  torchrun --nproc-per-node 4 -m dora_analysis.training.cli --parallel fsdp ...
  dora-analyze path/to/llama runs/lora

With --eval-data, every saved checkpoint is scored on held-out examples (seq-cls: accuracy and
cross-entropy; causal-lm: cross-entropy per target token and perplexity) in
checkpoint-N/eval_results.json; OUTPUT/eval_results.json lists all saved steps.

OUTPUT holds one run: a new run refuses a folder holding another run's checkpoints (or
eval_results.json), --overwrite deletes them; --resume OUTPUT/checkpoint-N continues a run."""


def has_default(action: argparse.Action) -> bool:
    """Whether ``--help`` shows the option's default (flags and required options have none)."""
    default = action.default
    return not (default is None or default is False or default == "" or action.required
                or default == argparse.SUPPRESS)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Plain text, each option's default after its help (flags and required options have
    none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if has_default(action) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = parser(prog="dora-train", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=HelpFormatter)
    d = TrainConfig()
    p.add_argument("--task", choices=TASKS, default=TASKS[0], help="what to train (see below)")
    p.add_argument("--model", metavar="PATH_OR_ID", required=True,
                   help="transformers model: a local folder or a Hugging Face Hub id")
    p.add_argument("--data", metavar="FILE", required=True, type=Path,
                   help="training examples (see tasks)")
    p.add_argument("--eval-data", metavar="FILE", type=Path,
                   help="held-out examples in the same form, scored at each save")
    p.add_argument("--text-field", metavar="NAME", default="text",
                   help="seq-cls: the field holding the text")
    p.add_argument("--label-field", metavar="NAME", default="label",
                   help="seq-cls: the field holding the label")
    p.add_argument("--max-length", metavar="N", type=int, default=128, help="tokens per example")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="ft (all weights), lora (Eq. 1) or dora (Eq. 5)")
    p.add_argument("--targets", metavar="NAMES", default=",".join(d.targets),
                   help="comma-separated names of the modules that get adapters (PEFT's suffix "
                   "rule: q_proj matches model.layers.0.self_attn.q_proj); auto = the attention "
                   "query and value projections. Linear, Conv1d, Conv2d, GPT-2 Conv1D and "
                   "Embedding modules can be adapted")
    p.add_argument("--magnitude-only", metavar="NAMES", default="",
                   help="dora: targets that train only their magnitude (paper Table 6)")
    p.add_argument("--rank", metavar="R", type=int, default=d.rank, help="adapter rank r")
    p.add_argument("--alpha", metavar="ALPHA", type=float, default=d.alpha,
                   help="adapter scale: alpha / r")
    p.add_argument("--dropout", metavar="P", type=float, default=d.dropout,
                   help="dropout on the adapter input")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rsLoRA)")
    p.add_argument("--full-norm-gradient", action="store_true",
                   help="dora: backpropagate through ||W0 + sBA|| (default: detached, paper "
                   "section 4.3)")
    p.add_argument("--lr", metavar="LR", type=float, default=d.lr,
                   help="peak learning rate (AdamW)")
    p.add_argument("--steps", metavar="N", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", metavar="N", type=int, default=d.batch_size,
                   help="examples per micro-batch, per process")
    p.add_argument("--grad-accum", metavar="N", type=int, default=d.grad_accum,
                   help="micro-batches per optimizer step")
    p.add_argument("--warmup", metavar="N", type=int, default=d.warmup_steps,
                   help="linear warm-up steps, then linear decay to zero")
    p.add_argument("--weight-decay", metavar="WD", type=float, default=d.weight_decay,
                   help="AdamW weight decay (biases and norm weights are never decayed)")
    p.add_argument("--max-grad-norm", metavar="NORM", type=float, default=d.max_grad_norm,
                   help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--save-steps", metavar="STEPS", default="",
                   help="steps to save at, e.g. 10,20,40 (the last step is always saved)")
    p.add_argument("--output", metavar="DIR", required=True, type=Path,
                   help="run folder for checkpoint-N/ subfolders")
    p.add_argument("--seed", metavar="N", type=int, default=d.seed,
                   help="seed of initialisation and data order")
    p.add_argument("--device", choices=DEVICES, default=d.device,
                   help="auto: CUDA, else Apple MPS, else CPU")
    p.add_argument("--dtype", type=canonical_dtype, choices=DTYPES, default=d.dtype,
                   help="autocast precision (weights stay float32); auto: bfloat16 on GPUs "
                   "that support it, else float32; bf16, fp16 and fp32 are accepted too")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, slower")
    p.add_argument("--parallel", choices=PARALLEL, default=d.parallel,
                   help="under torchrun: ddp (a full replica per process) or fsdp (FSDP2, "
                   "parameters sharded across processes)")
    p.add_argument("--resume", metavar="DIR", type=Path,
                   help="a checkpoint-N folder to continue, with the settings it was saved "
                   "with (in --output: the later checkpoints there must go, see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what --output holds of an earlier run (checkpoint-N folders, "
                   "eval_results.json; resuming: the checkpoints after the resumed step) "
                   "instead of refusing to mix two runs in one folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def load_model_files(transformers, args: argparse.Namespace):
    """The model's config and tokenizer (small files: the weights come later)."""
    what = "config"
    try:
        hf_config = transformers.AutoConfig.from_pretrained(args.model)
        what = "tokenizer"
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{args.model}: cannot load the {what} "
                          f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    special = len(set(tokenizer.all_special_ids))
    if len(tokenizer) <= special:  # transformers builds an empty one when the files are missing
        raise ConfigError(f"{args.model}: the tokenizer has no vocabulary beyond its {special} "
                          "special tokens (its files are missing?); copy the base model's "
                          "tokenizer files into the folder")
    return hf_config, tokenizer


def load_model(transformers, task, args: argparse.Namespace):
    """The model of ``--model`` for the task, weights in float32."""
    import torch

    # transformers 5 loads a checkpoint's own dtype by default; training keeps float32 masters.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        auto = getattr(transformers, task.auto_class)
        return auto.from_pretrained(args.model, **task.model_kwargs(),
                                    **{dtype_kw: torch.float32})
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{args.model}: cannot load the model "
                          f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None


def run(args: argparse.Namespace) -> int:
    checked = check_arguments(args)  # flags, --output, --resume, data: before anything loads
    config, task = checked.config, checked.task
    try:
        import transformers
    except ImportError:
        raise ConfigError("dora-train needs transformers: pip install 'dora-analysis[train]'"
                          ) from None
    import torch

    from .data import for_rank
    from .distributed import place
    from .loop import prepare, train
    from .runtime import start, stop

    # A new classification head is expected to be untrained: keep transformers' notes quiet.
    transformers.logging.set_verbosity_error()
    if args.quiet or not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
    runtime = start(args.device)
    try:
        hf_config, tokenizer = load_model_files(transformers, args)
        check_model(args, task, hf_config, tokenizer)
        batch_at, evaluate = task.batches(tokenizer, config.batch_size, config.seed)
        torch.manual_seed(args.seed)
        model = load_model(transformers, task, args)
        task.fit_model(model, tokenizer)
        batch_at = for_rank(batch_at, runtime.rank, runtime.world_size)
        model = place(prepare(model, config), config.parallel, runtime)
        if runtime.is_main:
            args.output.mkdir(parents=True, exist_ok=True)
            task.write_run_files(args.output)
        result = train(model, batch_at, config, resume=args.resume, evaluate=evaluate,
                       progress=not args.quiet)
    finally:
        stop(runtime)
    if not runtime.is_main:
        return 0
    for ck in result.checkpoints:
        print(ck)
    for metrics in result.evals:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items() if k != "step")
        print(f"step {metrics['step']}: held-out {shown}", file=sys.stderr)
    print(f"final loss {result.losses[-1]:.4f} after {config.steps} steps on "
          f"{runtime.device} ({runtime.world_size} process(es)); analyse with:\n"
          f"  dora-analyze {args.model} {args.output}", file=sys.stderr)
    return 0


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dora-train``."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            for category in (TruncationWarning, RunFolderWarning, ResumeWarning):
                warnings.simplefilter("always", category)
            warnings.showwarning = _print_warning
            return run(args)
    except DoraAnalysisError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM/SIGHUP through the console entry
        return interrupted(exc, "the last saved checkpoint can be resumed with --resume")


if __name__ == "__main__":  # torchrun -m dora_analysis.training.cli: signals as dora-train's
    from ..exits import run as run_command

    sys.exit(run_command(lambda: main))
