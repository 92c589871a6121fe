"""Watch ΔM and ΔD while a Hugging Face Trainer (or TRL's SFTTrainer) trains a DoRA adapter.

``DoraAnalysisCallback`` analyses every checkpoint the Trainer saves against the model's own
pre-trained weights, appends the rows to ``OUTPUT/dora_analysis.parquet`` and logs
``dora/<module>/delta_m``, ``delta_d`` and ``pearson_r`` next to the loss (here to TensorBoard:
``tensorboard --logdir OUTPUT``). Offline by default, on a tiny random-init LLaMA:

    python examples/trainer_callback.py --out runs/callback          # HF Trainer, ~1 min on CPU
    python examples/trainer_callback.py --out runs/callback --trl    # TRL SFTTrainer
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dora_analysis as da
from dora_analysis.integrations.transformers import DoraAnalysisCallback

try:  # run as a script from the repository root, or with examples/ on the path
    from train_causal_lm import tiny_llama
except ImportError:  # pragma: no cover
    from examples.train_causal_lm import tiny_llama


def texts(n: int = 64) -> list[dict]:
    return [{"prompt": f"What is {i % 9} times {i // 9}?",
             "completion": f" {i % 9} times {i // 9} is {(i % 9) * (i // 9)}."} for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="transformers causal LM (default: a tiny local LLaMA)")
    p.add_argument("--out", type=Path, default=Path("runs/callback"))
    p.add_argument("--trl", action="store_true", help="train with TRL's SFTTrainer")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    import peft
    import torch
    import transformers

    model_ref = args.model or str(tiny_llama(args.out / "tiny-llama"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_ref)
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(model_ref),
        peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"]))
    callback = DoraAnalysisCallback(modules=("q", "v"))  # base: the model's own source
    common = dict(output_dir=str(args.out / "run"), max_steps=args.steps,
                  save_steps=max(1, args.steps // 3), logging_steps=max(1, args.steps // 6),
                  learning_rate=5e-3, per_device_train_batch_size=8,
                  report_to=["tensorboard"])
    if args.trl:
        import datasets
        import trl

        trainer = trl.SFTTrainer(model=model, processing_class=tokenizer,
                                 args=trl.SFTConfig(**common, max_length=48,
                                                    bf16=torch.cuda.is_available()),
                                 train_dataset=datasets.Dataset.from_list(texts()),
                                 callbacks=[callback])
    else:
        encoded = [tokenizer(r["prompt"] + r["completion"], padding="max_length", max_length=32,
                             truncation=True) for r in texts()]
        data = [dict(e, labels=[t if m else -100 for t, m in
                                zip(e["input_ids"], e["attention_mask"], strict=True)])
                for e in encoded]
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common),
                                       train_dataset=data, callbacks=[callback])
    trainer.train()
    table = da.read_table(args.out / "run" / "dora_analysis.parquet")
    print(table.groupby(["step", "module"])[["delta_m", "delta_d"]].mean().to_string())
    print(f"\nlogged: tensorboard --logdir {args.out / 'run'}  (dora/q/delta_m, …)")


if __name__ == "__main__":
    main()
