"""--resume: the checkpoint's files and settings are checked against the flags before the model
is loaded; a mismatch is one error line naming each flag with both values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dora_analysis.errors import CheckpointFormatError, ConfigError
from dora_analysis.training import cli
from dora_analysis.training.cli import main
from dora_analysis.training.config import TrainConfig
from dora_analysis.training.loop import prepare, train

transformers = pytest.importorskip("transformers")


def qa(path: Path, n: int = 8) -> Path:
    path.write_text("\n".join(json.dumps({"prompt": f"what is {i}?", "response": f"it is {i}."})
                              for i in range(n)))
    return path


def argv(tiny_llama, data, out, *extra) -> list[str]:
    return ["--task", "causal-lm", "--model", str(tiny_llama), "--data", str(data),
            "--method", "lora", "--batch-size", "2", "--output", str(out), "-q", *extra]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llama):
    """checkpoint-2 of a LoRA run (rank 8, --targets auto = q_proj,v_proj, lr 1e-4)."""
    tmp = tmp_path_factory.mktemp("saved")
    data = qa(tmp / "qa.jsonl")
    assert main(argv(tiny_llama, data, tmp / "run", "--steps", "2")) == 0
    return data, tmp / "run" / "checkpoint-2"


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --resume was checked")

    monkeypatch.setattr(cli, "load_model_files", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--rank", "4"], "saved with --rank 8 (here 4)"),
    (["--targets", "q_proj,v_proj,k_proj"], "saved with --targets q_proj,v_proj (here "
                                            "q_proj,v_proj,k_proj)"),
    (["--method", "dora", "--rank", "2"], "saved with --method lora (here dora); --rank 8 "
                                          "(here 2)"),
    (["--task", "seq-cls"], "saved with --task (none) (here classifier,score); --task CAUSAL_LM "
                            "(here SEQ_CLS)"),
    (["--steps", "2"], "saved at step 2; --steps 2 leaves nothing to train"),
])
def test_settings_that_do_not_fit_are_refused_before_the_model_loads(
        tmp_path, capsys, tiny_llama, saved, no_model_loading, extra, message):
    data, checkpoint = saved
    if "seq-cls" in extra:
        data = tmp_path / "cls.jsonl"
        data.write_text("\n".join(json.dumps({"text": f"r{i}", "label": i % 2})
                                  for i in range(4)))
    rc = main(argv(tiny_llama, data, tmp_path / "out", "--steps", "4", "--resume",
                   str(checkpoint), *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --resume {checkpoint}: ") and message in err[0], err


@pytest.mark.parametrize("damage, message", [
    (lambda ck: (ck / "optimizer.pt").unlink(), "optimizer.pt missing; a checkpoint of "
                                                "dora-train holds trainer_state.json, "
                                                "optimizer.pt"),
    (lambda ck: (ck / "trainer_state.json").write_text("{broken"), "trainer_state.json is "
                                                                   "unreadable or not dora-"
                                                                   "train's (JSONDecodeError"),
    (lambda ck: (ck / "trainer_state.json").write_text('{"global_step": "2"}'),
     "trainer_state.json is unreadable or not dora-train's (KeyError"),
    (lambda ck: (ck / "adapter_model.safetensors").unlink(), "adapter_model.safetensors "
                                                             "missing"),
])
def test_a_damaged_checkpoint_is_refused_before_the_model_loads(
        tmp_path, capsys, tiny_llama, saved, no_model_loading, damage, message):
    import shutil

    data, checkpoint = saved
    copy = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    damage(copy)
    rc = main(argv(tiny_llama, data, tmp_path / "out", "--steps", "4", "--resume", str(copy)))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_changed_optimisation_settings_are_a_warning_and_training_goes_on(
        tmp_path, capsys, tiny_llama, saved):
    data, checkpoint = saved
    assert main(argv(tiny_llama, data, tmp_path / "out", "--steps", "3", "--resume",
                     str(checkpoint), "--lr", "0.001", "--batch-size", "4")) == 0
    warned = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("warning: ")]
    assert warned == [f"warning: --resume {checkpoint}: the run goes on with --lr 0.001 (was "
                      "0.0001), --batch-size 4 (was 2); it will not end where the "
                      "uninterrupted run would"]


def test_auto_targets_are_compared_once_resolved(tmp_path, tiny_llama, saved):
    """``--targets auto`` is known only with the model: train() compares the resolved names."""
    _, checkpoint = saved
    config = TrainConfig(method="lora", targets=("auto",), steps=3, output=tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    for layer in model.model.layers:  # auto now finds q_proj alone (no step runs: no forward)
        del layer.self_attn.v_proj
    model = prepare(model, config)
    with pytest.raises(ConfigError, match=r"saved with --targets q_proj,v_proj \(here q_proj\)"):
        train(model, lambda i: {}, config, resume=checkpoint)


def test_tensors_that_do_not_fit_are_listed(tmp_path, tiny_llama, saved):
    """The last line of defence, for a checkpoint whose settings match but whose file does not:
    every missing or reshaped tensor is named, nothing is copied."""
    import shutil

    _, checkpoint = saved
    copy = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    tensors = load_file(str(copy / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.zeros(3, 3)
    del tensors[sorted(tensors)[1]]
    save_file(tensors, str(copy / "adapter_model.safetensors"))
    config = TrainConfig(method="lora", targets=("q_proj", "v_proj"), steps=3, batch_size=2,
                         output=tmp_path / "out")
    model = prepare(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama), config)
    with pytest.raises(CheckpointFormatError, match=r"2 tensor\(s\) do not fit the model being "
                                                    r"trained: .*\[3, 3\] \(this model: .*"
                                                    r"\(missing\)"):
        train(model, lambda i: {}, config, resume=copy)
