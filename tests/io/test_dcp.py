"""PyTorch DCP folders, written by ``torch.distributed.checkpoint.save`` itself: per tensor and row
block without a process group, multi-chunk tensors, FQN prefixes, the allowlist unpickler, and the
analysis equal to the one of the same weights in safetensors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dora_analysis import analyze
from dora_analysis.cli import main
from dora_analysis.errors import CheckpointFormatError, UnsafeCheckpointError
from dora_analysis.io.dcp import DcpCheckpoint, find_dcp, read_metadata
from dora_analysis.io.open import ReadOptions, open_checkpoint
from dora_analysis.io.refs import CheckpointRef
from tests.common import llama_state, perturb
from tests.distributed import built_once, torchrun

WORKER = Path(__file__).with_name("dcp_worker.py")
#: HF LLaMA names → the Meta names torchtitan uses.
TITAN_NAMES = {"model.embed_tokens": "tok_embeddings", "model.layers": "layers",
               "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
               "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
               "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
               "mlp.down_proj": "feed_forward.w2", "lm_head": "output"}
#: HF LLaMA names → torchtune's.
TUNE_NAMES = {"model.embed_tokens": "tok_embeddings", "model.layers": "layers",
              "self_attn.o_proj": "attn.output_proj", "self_attn": "attn",
              "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2",
              "lm_head": "output"}
NUMBERS = ["name", "layer", "module", "rows", "cols", "axis", "delta_m", "delta_d",
           "zero_vectors", "n_vectors", "mean_m0", "dtype"]


def renamed(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        for hf, other in names.items():
            name = name.replace(hf, other)
        out[name] = t
    return out


def titan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return renamed(state, TITAN_NAMES)


def save(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=folder)
    return folder


@pytest.fixture(scope="session")
def dcps(ckpts, tmp_path_factory) -> dict[str, Path]:
    """DCP folders of the ``ckpts`` weights, as accelerate, HF Trainer and torchtitan lay them."""
    root = tmp_path_factory.mktemp("dcp")
    base, tuned = load_file(ckpts["base"]), load_file(ckpts["tuned"])
    mixed = {k: (v.to(torch.bfloat16) if "mlp" in k else v) for k, v in tuned.items()}
    save_file(mixed, str(root / "mixed.safetensors"))
    paths = {"mixed_safetensors": root / "mixed.safetensors"}
    # accelerate: {"model": sd}, plus a Python value (BytesStorageMetadata)
    paths["accelerate"] = save({"model": mixed | {"step": 7, "note": "x"}}, root / "accelerate")
    paths["base"] = save({"model": base}, root / "base")
    for step in (10, 20):  # HF Trainer, FSDP2 SHARDED: only pytorch_model_fsdp_0/ in checkpoint-N
        save({"model": perturb(base, step / 1000, seed=step)},
             root / "run" / f"checkpoint-{step}" / "pytorch_model_fsdp_0")
        (root / "run" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    paths["run"] = root / "run"
    # torchtitan: Meta names at the top level beside training state; step-N/ folders
    save_file(titan(base), str(root / "titan_base.safetensors"))
    paths["titan_base"] = root / "titan_base.safetensors"
    for step in (5, 15):
        weights = titan(perturb(base, step / 1000, seed=step))
        optimizer = {f"state.{k}.exp_avg": torch.zeros_like(v) for k, v in weights.items()}
        save(weights | {"optimizer": optimizer, "lr_scheduler": {"lr": torch.tensor(0.1)},
                        "dataloader": {"pos": 3}, "train_state": {"step": step}},
             root / "titan" / "checkpoint" / f"step-{step}")
        save_file(weights, str(root / f"titan_step{step}.safetensors"))
    paths["titan"] = root / "titan" / "checkpoint"
    paths["titan_safetensors"] = root / "titan_step15.safetensors"
    return paths


@pytest.fixture(scope="session")
def two_ranks(request) -> Path:
    """Saves of a 2-process gloo run: tensors split into chunks over both ranks."""
    return built_once(request.config, WORKER, ["torch"])


def test_reads_every_tensor_as_saved(dcps):
    expected = load_file(dcps["mixed_safetensors"])
    for backend in ("mmap", "pread"):
        with DcpCheckpoint(dcps["accelerate"], backend) as src:
            assert sorted(src.keys()) == sorted(f"model.{k}" for k in expected)  # no Python values
            for name, t in expected.items():
                got = src.get_tensor(f"model.{name}")
                assert got.dtype == t.dtype and torch.equal(got, t)
                assert src.info(f"model.{name}").shape == tuple(t.shape)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_row_block(dcps, two_ranks, data):
    folder = data.draw(st.sampled_from([dcps["accelerate"], two_ranks / "dtensor"]))
    backend = data.draw(st.sampled_from(["mmap", "pread"]))
    with DcpCheckpoint(folder, backend) as src:
        name = data.draw(st.sampled_from(src.keys()))
        whole = src.get_tensor(name)
        if whole.dim() == 0:
            return
        start = data.draw(st.integers(0, whole.shape[0]))
        stop = data.draw(st.integers(start, whole.shape[0] + 2))
        assert torch.equal(src.get_rows(name, start, stop), whole[start:stop])


def test_tensors_split_over_ranks(two_ranks):
    """Shard(0) with uneven rows, Shard(1) columns, a 4-D tensor, a replicated bias."""
    chunks = {k: len(v.chunks) for k, v in
              read_metadata(two_ranks / "dtensor").state_dict_metadata.items() if
              hasattr(v, "chunks")}
    assert chunks == {"model.rows.weight": 2, "model.cols.weight": 2, "model.bias": 1,
                      "model.conv.weight": 2}
    expected = load_file(two_ranks / "reference.safetensors")
    with DcpCheckpoint(two_ranks / "dtensor") as src:
        assert sorted(src.keys()) == sorted(f"model.{k}" for k in expected)
        for name, t in expected.items():
            assert torch.equal(src.get_tensor(f"model.{name}"), t)
            assert torch.equal(src.get_rows(f"model.{name}", 2, 5), t[2:5])


def test_fsdp2_save_without_training_state(two_ranks):
    """FSDP2 ``fully_shard`` weights beside optimizer and train state (torchtitan's layout):
    only the model is listed."""
    expected = load_file(two_ranks / "fsdp2_reference.safetensors")
    with DcpCheckpoint(two_ranks / "fsdp2") as src:
        assert sorted(src.keys()) == sorted(expected)
        for name, t in expected.items():
            assert torch.equal(src.get_tensor(name), t)


def test_non_contiguous_chunk_falls_back_to_torch_load(tmp_path):
    """DCP stores a transposed view as it is (its storage is not row-major)."""
    w = torch.randn(5, 7)
    folder = save({"a.weight": w.T, "b.weight": w}, tmp_path / "ckpt")
    with DcpCheckpoint(folder) as src:
        assert torch.equal(src.get_tensor("a.weight"), w.T)
        assert torch.equal(src.get_rows("a.weight", 2, 6), w.T[2:6])
        assert torch.equal(src.get_rows("b.weight", 1, 3), w[1:3])


def test_zstd_chunks_read_through_dcp_load(tmp_path):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    state = llama_state(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(tmp_path / "z", _extensions=[ZStandard()]))
    storage = read_metadata(tmp_path / "z").storage_data.values()
    assert all(s.transform_descriptors for s in storage)  # the bytes really are compressed
    with DcpCheckpoint(tmp_path / "z") as src:
        for name, t in state.items():
            assert torch.equal(src.get_tensor(name), t)
            if t.dim():
                assert torch.equal(src.get_rows(name, 1, 3), t[1:3])


def test_trainer_checkpoint_opens_its_dcp(dcps):
    step = dcps["run"] / "checkpoint-10"
    assert find_dcp(step) == step / "pytorch_model_fsdp_0"
    with open_checkpoint(step, ReadOptions()) as src:
        assert "model.model.layers.0.self_attn.q_proj.weight" in src.keys()


def test_analysis_equals_safetensors_of_the_same_weights(ckpts, dcps):
    """accelerate's ``model.`` prefix is aligned; DCP as tuned and as base."""
    reference = analyze(ckpts["base"], dcps["mixed_safetensors"], axis="both")
    tuned_dcp = analyze(ckpts["base"], dcps["accelerate"], axis="both")
    pd.testing.assert_frame_equal(tuned_dcp[NUMBERS], reference[NUMBERS])
    assert set(reference["dtype"]) == {"float32", "bfloat16"}
    base_dcp = analyze(dcps["base"], dcps["mixed_safetensors"], axis="both")
    assert (base_dcp["name"] == "model." + reference["name"]).all()  # the base's names
    pd.testing.assert_frame_equal(base_dcp[NUMBERS[1:]], reference[NUMBERS[1:]])


def test_torchtitan_series(dcps):
    ref = CheckpointRef.parse(str(dcps["titan"]))
    assert ref.kind == "series"
    table = analyze(dcps["titan_base"], dcps["titan"], modules=("q", "gate", "down"))
    assert sorted(set(table["step"])) == [5, 15]
    assert set(table["module"]) == {"q", "gate", "down"}
    last = table[table["step"] == 15].reset_index(drop=True)
    reference = analyze(dcps["titan_base"], dcps["titan_safetensors"],
                        modules=("q", "gate", "down"))
    pd.testing.assert_frame_equal(last[NUMBERS], reference[NUMBERS])


def test_torchtune_layout(ckpts, tmp_path):
    """torchtune's DistributedCheckpointer: ``{"model": …, "optimizer": …}`` plus Python values,
    its own module names mapped to kinds; equal to the same weights in safetensors."""
    base, tuned = (renamed(load_file(ckpts[k]), TUNE_NAMES) for k in ("base", "tuned"))
    optimizer = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in tuned.items()}}
    save({"model": tuned, "optimizer": optimizer, "seed": 3, "epochs_run": 1},
         tmp_path / "dist_epoch_0")
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    with DcpCheckpoint(tmp_path / "dist_epoch_0") as src:
        assert sorted(src.keys()) == sorted(f"model.{k}" for k in tuned)
    table = analyze(tmp_path / "base.safetensors", tmp_path / "dist_epoch_0")
    assert set(table["module"]) == {"q", "k", "v", "o", "gate", "up", "down", "tok_embeddings",
                                    "output"}
    reference = analyze(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    pd.testing.assert_frame_equal(table[NUMBERS], reference[NUMBERS])


def test_trainer_fsdp_series_in_the_cli(ckpts, dcps, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main([str(ckpts["base"]), str(dcps["run"]), "-o", str(out), "--quiet"]) == 0
    table = pd.read_csv(out)
    assert sorted(set(table["step"])) == [10, 20] and set(table["checkpoint"]) == {"run"}


# -- bad input -------------------------------------------------------------------------------------


class Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_metadata_that_would_run_code_is_refused(dcps, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(dcps["accelerate"], folder)
    metadata = read_metadata(folder)
    metadata.planner_data = {"x": Evil(tmp_path / "pwned")}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        DcpCheckpoint(folder)
    assert not (tmp_path / "pwned").exists()


def _cli_error(argv: list[str], capsys, out: Path) -> str:
    out.parent.mkdir(exist_ok=True)
    assert main([*argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not any(out.parent.iterdir())  # nothing left behind
    return err


def test_bad_dcp_folders_in_the_cli(ckpts, dcps, tmp_path, capsys):
    base, out = str(ckpts["base"]), tmp_path / "out" / "t.csv"
    evil = tmp_path / "evil"
    shutil.copytree(dcps["accelerate"], evil)
    (evil / ".metadata").write_bytes(pickle.dumps(Evil(tmp_path / "pwned")))
    err = _cli_error([base, str(evil)], capsys, out)
    assert "evil/.metadata: refused to unpickle" in err and not (tmp_path / "pwned").exists()

    missing = tmp_path / "missing"
    shutil.copytree(dcps["accelerate"], missing)
    (missing / "__0_0.distcp").unlink()
    err = _cli_error([base, str(missing)], capsys, out)
    assert "missing: __0_0.distcp missing (named by .metadata)" in err

    other = tmp_path / "other"  # the .metadata of another save: same names, other bytes
    shutil.copytree(dcps["accelerate"], other)
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in load_file(dcps["mixed_safetensors"]).items()}
    save({"model": bf16}, tmp_path / "bf16")
    shutil.copy(tmp_path / "bf16" / ".metadata", other / ".metadata")
    err = _cli_error([base, str(other)], capsys, out)
    assert "other/__0_0.distcp (tensor 'model." in err and ".metadata does not match" in err

    cut = tmp_path / "cut"
    shutil.copytree(dcps["accelerate"], cut)
    data = (cut / "__0_0.distcp").read_bytes()
    (cut / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    err = _cli_error([base, str(cut)], capsys, out)
    assert "cut/__0_0.distcp" in err and "truncated, or .metadata does not match" in err


@pytest.mark.slow
def test_accelerate_fsdp2_sharded_checkpoints(tmp_path, capsys):
    """End to end on what accelerate's ``save_fsdp_model`` writes for an FSDP2-sharded HF LLaMA
    (HF Trainer's call for SHARDED_STATE_DICT): the run folder is a series, equal to the
    gathered weights."""
    torchrun(Path(__file__).with_name("accelerate_worker.py"), str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()) == [
        "pytorch_model_fsdp_0"]
    out = tmp_path / "t.csv"
    assert main([str(tmp_path / "base"), str(tmp_path / "run"), "-o", str(out), "--quiet"]) == 0
    table = pd.read_csv(out)
    assert sorted(set(table["step"])) == [1, 2] and len(set(table["name"])) == 16
    reference = analyze(tmp_path / "base", tmp_path / "step2.safetensors")
    last = table[table["step"] == 2].reset_index(drop=True)
    assert (last["tuned_name"] == "model." + reference["tuned_name"]).all()
    pd.testing.assert_frame_equal(last[NUMBERS], reference[NUMBERS], check_dtype=False)
    # the same with PEFT DoRA under FSDP2, saved as HF Trainer does (adapter only, as DCP, the
    # run's adapter_config.json in the run folder): equal to the adapter gathered after step 2
    assert main([str(tmp_path / "base"), str(tmp_path / "peft-run"), "-o", str(out), "-q"]) == 0
    table = pd.read_csv(out)
    assert sorted(set(table["step"])) == [1, 2] and set(table["method"]) == {"dora"}
    assert len(set(table["name"])) == 6  # q, v, down of 2 layers
    reference = analyze(tmp_path / "base", tmp_path / "peft-step2")
    last = table[table["step"] == 2].reset_index(drop=True)
    pd.testing.assert_frame_equal(last[NUMBERS], reference[NUMBERS], check_dtype=False)


Q = "base_model.model.model.layers.0.self_attn.q_proj"
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                  "use_dora": True}


def dcp_adapter_run(folder: Path) -> dict[str, torch.Tensor]:
    """A run folder as HF Trainer + FSDP SHARDED_STATE_DICT leaves a PEFT DoRA model's: the
    adapter alone as DCP under ``checkpoint-2/pytorch_model_fsdp_0`` (accelerate's
    ``{"model": get_peft_model_state_dict(model)}``), no config."""
    g = torch.Generator().manual_seed(3)
    adapter = {f"{Q}.lora_A.weight": torch.randn(2, 16, generator=g),
               f"{Q}.lora_B.weight": torch.randn(24, 2, generator=g),
               f"{Q}.lora_magnitude_vector": 1 + torch.rand(24, generator=g)}
    save({"model": adapter}, folder / "checkpoint-2" / "pytorch_model_fsdp_0")
    return adapter


def test_fsdp_sharded_peft_adapter_without_config_is_explained(ckpts, tmp_path, capsys):
    """Without the run's adapter_config.json the factors cannot be merged: no silent nonsense."""
    dcp_adapter_run(tmp_path / "run")
    err = _cli_error([str(ckpts["base"]), str(tmp_path / "run")], capsys,
                     tmp_path / "out" / "t.csv")
    assert "pytorch_model_fsdp_0: holds LoRA adapter factors" in err
    assert "copy the run's adapter_config.json into the checkpoint folder or the run folder" in err


@pytest.mark.parametrize("config_in", ["run", "checkpoint", "dcp"])
def test_fsdp_sharded_peft_adapter_with_the_runs_config(ckpts, tmp_path, config_in):
    """With the config beside it (run folder, checkpoint-N/ or the DCP folder) the DCP adapter
    reads as the same adapter saved by save_pretrained."""
    run = tmp_path / "run"
    adapter = dcp_adapter_run(run)
    where = {"run": run, "checkpoint": run / "checkpoint-2",
             "dcp": run / "checkpoint-2" / "pytorch_model_fsdp_0"}[config_in]
    (where / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    save_file(adapter, folder / "adapter_model.safetensors")
    expected = analyze(ckpts["base"], folder)
    table = analyze(ckpts["base"], run)
    assert list(table["step"]) == [2] and list(table["method"]) == ["dora"]
    pd.testing.assert_frame_equal(table[NUMBERS], expected[NUMBERS])
    with pytest.raises(CheckpointFormatError, match="is an adapter, not a base model"):
        analyze(run / "checkpoint-2", ckpts["base"])


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_a_distcp_file_truncated_while_read_is_reported_by_name(tmp_path, backend):
    """The mapped .distcp file is guarded like a safetensors file: never SIGBUS, an error."""
    import threading
    import time

    from dora_analysis.errors import CheckpointChangedError, DoraAnalysisError
    from dora_analysis.io.dcp import DcpCheckpoint

    folder = save({"w": torch.arange(256 * 16, dtype=torch.float32).reshape(256, 16)},
                  tmp_path / "dcp")
    (shard,) = folder.glob("*.distcp")
    with DcpCheckpoint(folder, backend) as src:
        expected = src.get_rows("w", 0, 256)
        writer = threading.Thread(target=lambda: open(shard, "r+b").truncate(200), daemon=True)
        writer.start()  # waits in open() while the lease is held, never in this thread
        deadline, error = time.time() + 20, None
        while error is None and time.time() < deadline:
            try:
                assert torch.equal(src.get_rows("w", 0, 256), expected)
            except DoraAnalysisError as exc:
                error = exc
            time.sleep(0.01)
        writer.join(10)
    assert isinstance(error, CheckpointChangedError) and str(shard) in str(error)


# -- PyTorch's DCP recipe: dcp.save({"app": AppState(model, optimizer)}) ---------------------------


class AppState:
    """The Stateful of PyTorch's "Getting started with DCP" recipe, as written there."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state_dict, optimizer_state_dict = get_state_dict(self.model, self.optimizer)
        return {"model": model_state_dict, "optim": optimizer_state_dict}

    def load_state_dict(self, state_dict: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


def module_of(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose ``state_dict()`` is ``state`` (floats as parameters, ints as buffers)."""
    root = torch.nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if t.is_floating_point():
            owner.register_parameter(leaf, torch.nn.Parameter(t.clone()))
        else:
            owner.register_buffer(leaf, t.clone())
    return root


def test_the_dcp_recipes_app_state_aligns_with_the_base(tmp_path):
    """``app.model.<fqn>`` is the model (named ``model.<fqn>``, as accelerate's), ``app.optim.…``
    is not listed; the analysis equals the one of the same weights in safetensors."""
    from torch.distributed.checkpoint.stateful import Stateful

    assert issubclass(AppState, Stateful)  # a Stateful by its protocol, as in the recipe
    base = llama_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    model = module_of(base)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    sum((p * torch.randn(p.shape, generator=g)).sum() for p in model.parameters()).backward()
    optimizer.step()
    save({"app": AppState(model, optimizer)}, tmp_path / "app")
    names = read_metadata(tmp_path / "app").state_dict_metadata
    assert "app.model.lm_head.weight" in names and any(k.startswith("app.optim.") for k in names)
    tuned = {k: v.detach() for k, v in model.state_dict().items()}
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    with DcpCheckpoint(tmp_path / "app") as src:
        assert sorted(src.keys()) == sorted(f"model.{k}" for k in tuned)
        for name, t in tuned.items():
            assert torch.equal(src.get_tensor(f"model.{name}"), t)
    table = analyze(tmp_path / "base.safetensors", tmp_path / "app")
    reference = analyze(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    assert len(table) == len(reference) == 3 * 7 + 2
    pd.testing.assert_frame_equal(table[NUMBERS], reference[NUMBERS])
