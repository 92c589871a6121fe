"""Quantized checkpoints: FP8 (per tensor, per channel, per block) and LLM.int8 dequantized in
plain torch; 4-bit and GPTQ refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.errors import CheckpointFormatError

NAME = "model.layers.0.mlp.down_proj.weight"


def pair(tmp_path, tuned_state, dequantized):
    """Write a float base, the quantized tuned file and its hand-dequantized float twin."""
    g = torch.Generator().manual_seed(0)
    base = {NAME: torch.randn(dequantized.shape, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned_state, str(tmp_path / "quant.safetensors"))
    save_file({NAME: dequantized.float()}, str(tmp_path / "float.safetensors"))
    return (tmp_path / "base.safetensors", tmp_path / "quant.safetensors",
            tmp_path / "float.safetensors")


def assert_same_analysis(base, quant, flt):
    for block in (1 << 22, 300 * 7):  # also with row blocks that cut across 128-row blocks
        a = da.analyze(base, quant, axis="both", block_elements=block)
        b = da.analyze(base, flt, axis="both", block_elements=block)
        for col in (C.DELTA_M, C.DELTA_D):
            assert a[col].tolist() == pytest.approx(b[col].tolist(), rel=1e-6)


@pytest.mark.parametrize("scale_shape", [(), (1,), (200, 1)])
def test_fp8_with_weight_scale(tmp_path, scale_shape):
    g = torch.Generator().manual_seed(1)
    w8 = torch.randn(200, 300, generator=g).to(torch.float8_e4m3fn)
    scale = torch.rand(scale_shape, generator=g) + 0.5
    deq = w8.double() * (scale.double().reshape(-1, 1) if scale.numel() > 1 else float(scale))
    state = {NAME: w8, NAME + "_scale": scale,
             "model.layers.0.mlp.down_proj.input_scale": scale.clone()}
    assert_same_analysis(*pair(tmp_path, state, deq))


def test_fp8_with_block_scale_inv(tmp_path):
    g = torch.Generator().manual_seed(2)
    out, inp = 200, 300  # not multiples of the 128 block
    w8 = torch.randn(out, inp, generator=g).to(torch.float8_e5m2)
    inv = torch.rand(math.ceil(out / 128), math.ceil(inp / 128), generator=g) + 0.5
    full = inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:out, :inp]
    assert_same_analysis(*pair(tmp_path, {NAME: w8, NAME + "_scale_inv": inv},
                                w8.double() * full.double()))


def test_bitsandbytes_int8(tmp_path):
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (64, 96), generator=g, dtype=torch.int8)
    scb = torch.rand(64, generator=g) * 2
    state = {NAME: q, "model.layers.0.mlp.down_proj.SCB": scb,
             "model.layers.0.mlp.down_proj.weight_format": torch.tensor([0], dtype=torch.uint8)}
    assert_same_analysis(*pair(tmp_path, state, q.double() * scb.double()[:, None] / 127))


@pytest.mark.parametrize("extra, fmt", [
    ({NAME + ".absmax": torch.ones(4), NAME + ".quant_state.bitsandbytes__nf4":
      torch.zeros(8, dtype=torch.uint8)}, "bitsandbytes 4-bit"),
    ({"model.layers.0.mlp.down_proj.qweight": torch.zeros(4, 4, dtype=torch.int32),
      "model.layers.0.mlp.down_proj.qzeros": torch.zeros(1, 4, dtype=torch.int32)}, "GPTQ/AWQ"),
])
def test_refused_formats_are_named(tmp_path, extra, fmt):
    save_file({"model.embed.weight": torch.ones(3, 2)}, str(tmp_path / "base.safetensors"))
    save_file(extra, str(tmp_path / "q.safetensors"))
    with pytest.raises(CheckpointFormatError, match=fmt):
        da.analyze(tmp_path / "base.safetensors", tmp_path / "q.safetensors")


def test_fp8_without_scale_is_refused(tmp_path):
    save_file({NAME: torch.ones(3, 2)}, str(tmp_path / "base.safetensors"))
    save_file({NAME: torch.ones(3, 2).to(torch.float8_e4m3fn)}, str(tmp_path / "q.safetensors"))
    with pytest.raises(CheckpointFormatError, match="FP8 without a weight_scale"):
        da.analyze(tmp_path / "base.safetensors", tmp_path / "q.safetensors")
