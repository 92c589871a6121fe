"""DeepSpeed ZeRO-1/2/3 checkpoints written by DeepSpeed itself (2 CPU ranks): the 16-bit weights,
the fp32 masters bit for bit equal to DeepSpeed's ``zero_to_fp32``, Trainer layouts, series, and
every bad-input path. The fixtures are built once per change (see tests/distributed.py)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from dora_analysis import analyze
from dora_analysis.cli import main
from dora_analysis.errors import CheckpointNotFoundError, UnsafeCheckpointError
from dora_analysis.io.deepspeed import ZeroMasters, find_zero, open_zero
from dora_analysis.io.open import ReadOptions, open_checkpoint
from dora_analysis.io.refs import CheckpointRef
from tests.distributed import built_once

WORKER = Path(__file__).with_name("deepspeed_worker.py")
NUMBERS = ["name", "layer", "module", "rows", "cols", "axis", "delta_m", "delta_d",
           "zero_vectors", "n_vectors", "mean_m0", "dtype"]


@pytest.fixture(scope="session")
def zero(request) -> Path:
    return built_once(request.config, WORKER, ["torch", "deepspeed"],
                      env={"DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp32_masters_bit_for_bit(zero, stage):
    """Every tensor and every row block equals DeepSpeed's own rebuild, dtype included."""
    oracle = load_file(zero / f"zero{stage}_fp32.safetensors")
    with open_zero(zero / f"zero{stage}", "fp32") as src:
        assert isinstance(src, ZeroMasters)
        assert sorted(src.keys()) == sorted(oracle)
        for name, expected in oracle.items():
            got = src.get_tensor(name)
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
            assert src.info(name).shape == tuple(expected.shape)
            rows = expected.shape[0] if expected.dim() else 0
            for start in range(rows):
                for stop in range(start, rows + 2):
                    assert torch.equal(src.get_rows(name, start, stop), expected[start:stop])


def test_what_the_fixture_exercises(zero):
    """Two parameter groups, padding, a frozen, a tied and a buffer tensor (else the test above
    proves less than it claims)."""
    folder = zero / "zero3" / "global_step3"
    states = torch.load(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=True)
    assert len(states["param_shapes"]) == 2 and states["buffer_names"] == ["inv_freq"]
    assert list(states["frozen_param_shapes"]) == ["k_proj.weight"]
    assert states["shared_params"] == {"lm_head.weight": "embed_tokens.weight"}
    numels = [s.numel() for group in states["param_shapes"] for s in group.values()]
    assert any(n % 2 for n in numels)  # padded to 2 ranks


@pytest.mark.parametrize("stage", [1, 2])
def test_auto_reads_the_16bit_module(zero, stage):
    """ZeRO-1/2 keep the 16-bit weights, which are the fp32 masters rounded to bf16."""
    oracle = load_file(zero / f"zero{stage}_fp32.safetensors")
    with open_checkpoint(zero / f"zero{stage}", ReadOptions()) as src:
        for name in ("q_proj.weight", "up_proj.weight", "lm_head.weight"):
            got = src.get_tensor(name)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, oracle[name].to(torch.bfloat16))


def test_zero3_auto_reads_fp32_masters_with_a_note(zero, caplog):
    with caplog.at_level(logging.INFO, logger="dora_analysis"):
        src = open_checkpoint(zero / "zero3", ReadOptions())
    assert isinstance(src, ZeroMasters) and src.info("q_proj.weight").dtype == "float32"
    assert "ZeRO-3 keeps no 16-bit weights" in caplog.text


def test_trainer_checkpoint(zero):
    """HF Trainer's ``checkpoint-N/``: its model.safetensors for auto, the masters for fp32."""
    folder = zero / "trainer" / "checkpoint-3"
    assert find_zero(folder) == folder / "global_step3"
    oracle = load_file(zero / "zero2_fp32.safetensors")
    with open_checkpoint(folder, ReadOptions()) as src:
        assert src.path == folder / "model.safetensors"
    with open_checkpoint(folder, ReadOptions(precision="fp32")) as src:
        assert torch.equal(src.get_tensor("down_proj.weight"), oracle["down_proj.weight"])
    ref = CheckpointRef.parse(str(folder))
    assert (ref.default_label, ref.step) == ("trainer", 3)


def test_analysis_equals_the_float64_reference(zero):
    """The table of the ZeRO folder equals the one of DeepSpeed's fp32 state dict saved as
    safetensors; ``dtype`` says which precision was read."""
    base = zero / "base.safetensors"
    for stage in (2, 3):
        ours = analyze(base, zero / f"zero{stage}", precision="fp32", axis="both")
        reference = analyze(base, zero / f"zero{stage}_fp32.safetensors", axis="both")
        ours = ours.sort_values(["name", "axis"]).reset_index(drop=True)
        reference = reference.sort_values(["name", "axis"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(ours[NUMBERS], reference[NUMBERS])
        # trainable weights are fp32 masters; the frozen one is kept as trained, in bf16
        assert set(ours.loc[ours["name"] != "k_proj.weight", "dtype"]) == {"float32"}
        assert set(ours.loc[ours["name"] == "k_proj.weight", "dtype"]) == {"bfloat16"}
    assert set(analyze(base, zero / "zero2")["dtype"]) == {"bfloat16"}


def test_zero3_series_in_the_cli(zero, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main([str(zero / "base.safetensors"), str(zero / "run3"), "-o", str(out)]) == 0
    table = pd.read_csv(out)
    assert sorted(set(table["step"])) == [2, 4]
    assert set(table.loc[table["module"] == "q", "dtype"]) == {"float32"}
    assert "note:" in capsys.readouterr().err
    assert main([str(zero / "base.safetensors"), str(zero / "zero2"), "--precision", "fp32",
                 "-o", str(out), "--quiet"]) == 0
    table = pd.read_csv(out)
    assert set(table.loc[table["module"] == "q", "dtype"]) == {"float32"}


# -- bad input -------------------------------------------------------------------------------------


def _copy(zero: Path, name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(zero / name, folder)
    return folder


def _cli_error(argv: list[str], capsys, tmp_path: Path) -> str:
    out = tmp_path / "out" / "t.csv"
    out.parent.mkdir(exist_ok=True)
    assert main([*argv, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not any(out.parent.iterdir())  # nothing left behind
    return err


def test_missing_rank_partition(zero, tmp_path, capsys):
    base = str(zero / "base.safetensors")
    z2 = _copy(zero, "zero2", tmp_path)
    (z2 / "global_step3" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    err = _cli_error([base, str(z2), "--precision", "fp32"], capsys, tmp_path)
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt missing" in err
    assert main([base, str(z2), "--quiet"]) == 0  # the 16-bit weights do not need it

    z3 = _copy(zero, "zero3", tmp_path)
    (z3 / "global_step3" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    err = _cli_error([base, str(z3)], capsys, tmp_path)
    assert "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt missing" in err

    z3 = tmp_path / "zero3"
    shutil.rmtree(z3)
    z3 = _copy(zero, "zero3", tmp_path)
    (z3 / "global_step3" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    err = _cli_error([base, str(z3)], capsys, tmp_path)
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt missing" in err


def test_fp32_without_optimizer_files(zero, tmp_path):
    z1 = _copy(zero, "zero1", tmp_path)
    for f in (z1 / "global_step3").glob("*_optim_states.pt"):
        f.unlink()
    with pytest.raises(CheckpointNotFoundError, match="no ZeRO optimizer partitions"):
        open_zero(z1, "fp32")


def test_latest_naming_a_missing_folder(zero, tmp_path, capsys):
    z2 = _copy(zero, "zero2", tmp_path)
    (z2 / "latest").write_text("global_step99")
    err = _cli_error([str(zero / "base.safetensors"), str(z2)], capsys, tmp_path)
    assert "latest names global_step99" in err


def test_optimizer_file_that_would_run_code(zero, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    z2 = _copy(zero, "zero2", tmp_path)
    torch.save({"optimizer_state_dict": {"zero_stage": Evil()}},
               z2 / "global_step3" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeCheckpointError, match="refused to unpickle"):
        open_zero(z2, "fp32")
    err = _cli_error([str(zero / "base.safetensors"), str(z2), "--precision", "fp32"], capsys,
                     tmp_path)
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: refused to unpickle" in err
    assert not (tmp_path / "pwned").exists()
