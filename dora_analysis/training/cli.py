"""``dora-train``: fine-tune a ``transformers`` model for sequence classification with FT, LoRA or
DoRA and save a checkpoint series that ``dora-analyze`` reads.

    dora-train --model path/or/hub-id --data train.jsonl --method dora --targets query,value \\
               --steps 200 --save-steps 50,100,150 --output runs/dora --eval-data heldout.jsonl

With ``--eval-data``, every saved checkpoint is scored on the held-out examples (accuracy and
mean cross-entropy, in ``checkpoint-N/eval_results.json``); ``OUTPUT/eval_results.json`` lists
all saved steps.

Exit codes: 0 success, 2 bad input (one ``error: …`` line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..console import parser
from .config import DTYPES, METHODS, TrainConfig
from .loop import prepare, train

#: Heads that sequence classification adds and that must train with the adapters (as PEFT does).
CLASSIFIER_HEADS = ("classifier", "score")


class TrainInputError(ValueError):
    """Bad data or settings given to dora-train."""


def read_examples(path: Path, text_field: str, label_field: str,
                  min_labels: int = 2) -> tuple[list[str], list[str]]:
    """Texts and labels from a JSONL (one object per line) or CSV file."""
    import pandas as pd

    if not path.is_file():
        raise TrainInputError(f"{path}: no such data file")
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=path.suffix.lower() == ".jsonl")
        elif path.suffix.lower() == ".csv":
            frame = pd.read_csv(path)
        else:
            raise TrainInputError(f"{path}: data must be .jsonl or .csv")
    except ValueError as exc:
        raise TrainInputError(f"{path}: cannot be read ({str(exc).splitlines()[0]})") from None
    missing = [f for f in (text_field, label_field) if f not in frame.columns]
    if missing:
        raise TrainInputError(f"{path}: no field(s) {', '.join(missing)} (fields: "
                              f"{', '.join(map(str, frame.columns))}); use --text-field and "
                              "--label-field")
    frame = frame.dropna(subset=[text_field, label_field])
    labels = frame[label_field].astype(str).tolist()
    if len(set(labels)) < min_labels:
        raise TrainInputError(f"{path}: needs at least {min_labels} distinct label(s) in "
                              f"'{label_field}'")
    return frame[text_field].astype(str).tolist(), labels


def make_batches(encodings: dict, label_ids: torch.Tensor, batch_size: int, seed: int):
    """``batch_at(i)``: micro-batch i of a reshuffle-every-epoch order fixed by the seed."""
    n = len(label_ids)

    def batch_at(i: int) -> dict:
        start = i * batch_size
        index = []
        while len(index) < batch_size:
            epoch, offset = divmod(start + len(index), n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            take = order[offset : offset + batch_size - len(index)]
            index += take.tolist()
        idx = torch.tensor(index)
        return {k: v[idx] for k, v in encodings.items()} | {"labels": label_ids[idx]}

    return batch_at


def accuracy_eval(encodings: dict, label_ids: torch.Tensor, batch_size: int = 64):
    """``evaluate(model)`` → held-out accuracy and mean cross-entropy of a classifier."""
    def evaluate(model) -> dict:
        correct, loss = 0, 0.0
        for start in range(0, len(label_ids), batch_size):
            batch = {k: v[start : start + batch_size] for k, v in encodings.items()}
            labels = label_ids[start : start + batch_size]
            logits = model(**batch).logits.float()
            loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        n = len(label_ids)
        return {"accuracy": correct / n, "loss": loss / n, "n": n}
    return evaluate


def collect_evals(output: Path) -> list[dict]:
    """The ``eval_results.json`` of every ``checkpoint-N`` in a run, by step."""
    found = [json.loads(p.read_text()) for p in output.glob("checkpoint-*/eval_results.json")]
    return sorted(found, key=lambda e: e["step"])


def build_parser() -> argparse.ArgumentParser:
    p = parser(prog="dora-train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    p.add_argument("--model", required=True, help="transformers model: local folder or Hub id")
    p.add_argument("--data", required=True, type=Path, help="training data, .jsonl or .csv")
    p.add_argument("--eval-data", type=Path,
                   help="held-out examples (.jsonl or .csv, same fields) scored at each save")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--method", choices=METHODS, default=defaults.method)
    p.add_argument("--targets", default=",".join(defaults.targets),
                   help="comma-separated module names for adapters (PEFT's suffix rule)")
    p.add_argument("--magnitude-only", default="",
                   help="DoRA targets that train only their magnitude (paper Table 6)")
    p.add_argument("--rank", type=int, default=defaults.rank)
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument("--dropout", type=float, default=defaults.dropout)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    p.add_argument("--full-norm-gradient", action="store_true",
                   help="DoRA: backpropagate through ||W0 + sBA|| (default: detached, §4.3)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    p.add_argument("--warmup", type=int, default=defaults.warmup_steps, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                   help="AdamW weight decay (biases and norm weights are never decayed)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--save-steps", default="", help="e.g. 10,20,40 (the last step is always saved)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype)
    p.add_argument("--resume", type=Path, help="a checkpoint-N folder of this run to continue")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TrainInputError(f"{flag} takes comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        import transformers
    except ImportError:
        raise TrainInputError("dora-train needs transformers: pip install transformers") from None
    # The new classification head is expected to be untrained: keep transformers' notes quiet.
    transformers.logging.set_verbosity_error()
    if args.quiet or not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
    texts, labels = read_examples(args.data, args.text_field, args.label_field)
    names = sorted(set(labels))
    heldout = None
    if args.eval_data is not None:
        heldout = read_examples(args.eval_data, args.text_field, args.label_field, min_labels=1)
        unknown = sorted(set(heldout[1]) - set(names))
        if unknown:
            raise TrainInputError(f"{args.eval_data}: label(s) not in the training data: "
                                  f"{', '.join(unknown[:5])}")
    config = TrainConfig(
        method=args.method, targets=tuple(t for t in args.targets.split(",") if t),
        magnitude_only=tuple(t for t in args.magnitude_only.split(",") if t),
        rank=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora,
        detach_norm=not args.full_norm_gradient, modules_to_save=CLASSIFIER_HEADS,
        lr=args.lr, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup, weight_decay=args.weight_decay, seed=args.seed,
        save_steps=_ints(args.save_steps, "--save-steps"), output=args.output, dtype=args.dtype,
        extra={"task_type": "SEQ_CLS", "base_model_name_or_path": args.model,
               "labels": names},
    )
    torch.manual_seed(args.seed)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)})
    except OSError as exc:
        raise TrainInputError(f"{args.model}: cannot load the model ({str(exc).splitlines()[0]})"
                              ) from None
    def encode(texts: list[str], labels: list[str]) -> tuple[dict, torch.Tensor]:
        encodings = dict(tokenizer(texts, truncation=True, max_length=args.max_length,
                                   padding="max_length", return_tensors="pt"))
        return encodings, torch.tensor([names.index(label) for label in labels])

    encodings, label_ids = encode(texts, labels)
    evaluate = accuracy_eval(*encode(*heldout)) if heldout is not None else None
    prepare(model, config)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "labels.json").write_text(json.dumps(names))
    result = train(model, make_batches(encodings, label_ids, config.batch_size, config.seed),
                   config, resume=args.resume, evaluate=evaluate, progress=not args.quiet)
    for ck in result.checkpoints:
        print(ck)
    for metrics in result.evals:
        print(f"step {metrics['step']}: held-out accuracy {metrics['accuracy']:.4f} "
              f"(loss {metrics['loss']:.4f}, n={metrics['n']})", file=sys.stderr)
    if evaluate is not None:
        (args.output / "eval_results.json").write_text(
            json.dumps(collect_evals(args.output), indent=1))
    print(f"final loss {result.losses[-1]:.4f} after {config.steps} steps; analyse with:\n"
          f"  dora-analyze {args.model} {args.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dora-train``."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (TrainInputError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (the last saved checkpoint can be resumed with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
