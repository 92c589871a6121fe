"""torchrun with 2 CPU processes (gloo): FSDP2 trains the same weights as DDP, checkpoints are
written once, by rank 0, complete (full shapes, every entry), and a sharded run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.torchrun import torchrun

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")
WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(WORKER, str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, {r["name"]: r for r in ranks[0]}, {r["name"]: r for r in ranks[1]}


def close(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(torch.tensor(a[name]), torch.tensor(b[name]), rtol=1e-4,
                                   atol=1e-5, msg=name)


def test_fsdp_trains_the_weights_ddp_trains(runs):
    _, rank0, rank1 = runs
    assert rank0["fsdp-dora"]["sharded"] == 3  # each decoder layer, then the rest
    assert rank0["ddp-dora"]["sharded"] == 0
    assert rank0["ddp-dora"]["losses"] == pytest.approx(rank0["fsdp-dora"]["losses"], rel=1e-5)
    close(rank0["ddp-dora"]["weights"], rank0["fsdp-dora"]["weights"])
    close(rank0["fsdp-dora"]["weights"], rank1["fsdp-dora"]["weights"])  # gathered on both


def test_only_rank0_writes_complete_checkpoints(runs):
    out, rank0, rank1 = runs
    for name in ("ddp-dora", "fsdp-dora", "fsdp-lora", "fsdp-ft"):
        assert [Path(p).name for p in rank0[name]["saved"]] == ["checkpoint-2", "checkpoint-3"]
        assert rank1[name]["saved"] == []
        assert sorted(p.name for p in (out / name).iterdir()) == ["checkpoint-2", "checkpoint-3"]
    ddp = load_file(str(out / "ddp-dora" / "checkpoint-3" / "adapter_model.safetensors"))
    fsdp = load_file(str(out / "fsdp-dora" / "checkpoint-3" / "adapter_model.safetensors"))
    assert sorted(ddp) == sorted(fsdp) and len(ddp) == 2 * 2 * 3  # 2 layers × q,v × A,B,m
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)
    assert fsdp["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (2, 16)
    full = load_file(str(out / "fsdp-ft" / "checkpoint-3" / "model.safetensors"))
    assert full["model.embed_tokens.weight"].shape == (64, 16)  # gathered, not a shard
    assert full["model.layers.0.mlp.up_proj.weight"].shape == (24, 16)
    assert len(full) == 2 + 2 * 9 + 1  # embed, norm, lm_head; 7 projections + 2 norms a layer
    close({k: v.tolist() for k, v in full.items() if k in rank0["fsdp-ft"]["weights"]},
          rank0["fsdp-ft"]["weights"])


def test_a_sharded_run_resumes_to_the_same_weights(runs):
    _, rank0, _ = runs
    straight, resumed = rank0["fsdp-dora"], rank0["fsdp-dora-resumed"]
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5)
    close(straight["weights"], resumed["weights"])


def test_dora_train_cli_under_torchrun_with_fsdp(tmp_path, tiny_llama):
    """The command itself: process group from torchrun, FSDP2, each rank its own batches."""
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"what is {i} plus {i}?",
                                          "response": f"it is {2 * i}."}) for i in range(16)))
    torchrun("-m", "dora_analysis.training.cli", "--task", "causal-lm", "--model",
             str(tiny_llama), "--data", str(data), "--method", "dora", "--parallel", "fsdp",
             "--device", "cpu", "--steps", "3", "--save-steps", "2", "--batch-size", "2",
             "--eval-data", str(data), "--output", str(tmp_path / "run"), "-q")
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint-2", "checkpoint-3", "eval_results.json"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["config"]["parallel"] == "fsdp" and len(state["log_history"]) == 3
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (
        8, 32)  # full, gathered from both processes
