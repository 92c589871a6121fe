"""What DoraAnalysisCallback costs a Trainer run: wall time with and without it, same run.

A random-init LLaMA (default 4 layers, hidden 512, vocabulary 8000) trains a PEFT DoRA adapter
on q/k/v/o for ``--steps`` steps on the CPU, saving every ``--save-every`` steps; the run is
repeated with the callback (analysis of every saved checkpoint, Parquet rows, logging), in
interleaved rounds, best of each kept. Prints the ratio and the seconds each analysis adds.

    python benchmarks/bench_callback.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def child(with_callback: bool, steps: int, save_every: int, hidden: int, layers: int) -> dict:
    import peft
    import torch
    import transformers

    from dora_analysis.integrations.transformers import DoraAnalysisCallback

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=8000, hidden_size=hidden,
                                          intermediate_size=hidden * 8 // 3,
                                          num_hidden_layers=layers, num_attention_heads=8,
                                          num_key_value_heads=4)
        transformers.LlamaForCausalLM(config).save_pretrained(f"{tmp}/base")
        model = peft.get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/base"),
            peft.LoraConfig(r=16, lora_alpha=32, use_dora=True,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        g = torch.Generator().manual_seed(1)
        data = []
        for _ in range(64):
            ids = torch.randint(0, 8000, (128,), generator=g)
            data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        args = transformers.TrainingArguments(
            output_dir=f"{tmp}/run", max_steps=steps, save_steps=save_every, logging_steps=1,
            per_device_train_batch_size=4, use_cpu=True, report_to=[], disable_tqdm=True,
            save_only_model=True)
        callbacks = [DoraAnalysisCallback()] if with_callback else []
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       callbacks=callbacks)
        start = time.perf_counter()
        trainer.train()
        return {"seconds": time.perf_counter() - start, "saves": steps // save_every}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best kept")
    p.add_argument("--child", choices=["with", "without"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "with", args.steps, args.save_every, args.hidden,
                               args.layers)))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in ("without", "with"):
            proc = subprocess.run([sys.executable, __file__, "--child", variant, "--steps",
                                   str(args.steps), "--save-every", str(args.save_every),
                                   "--hidden", str(args.hidden), "--layers", str(args.layers)],
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if variant not in best or r["seconds"] < best[variant]["seconds"]:
                best[variant] = r
    plain, watched = best["without"]["seconds"], best["with"]["seconds"]
    saves = best["with"]["saves"]
    print(f"LLaMA {args.layers} layers × hidden {args.hidden}, PEFT DoRA r=16 on q/k/v/o, "
          f"{args.steps} steps, {saves} saves, CPU, best of {args.rounds}")
    print(f"without callback {plain:.2f} s, with {watched:.2f} s: ratio {watched / plain:.3f}, "
          f"{(watched - plain) / saves:.2f} s per analysed checkpoint")


if __name__ == "__main__":
    main()
