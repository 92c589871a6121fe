"""Device and precision choices."""

from __future__ import annotations

import pytest
import torch

from dora_analysis.errors import ConfigError
from dora_analysis.training.config import TrainConfig
from dora_analysis.training.runtime import autocast_dtype, resolve_device, start


def test_auto_and_cpu_resolve_to_what_is_there():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected is None and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == (expected or "cpu")
    assert start("cpu").device == torch.device("cpu") and not start("cpu").distributed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_cuda_without_a_gpu_says_what_to_do():
    with pytest.raises(ConfigError, match=r"--device cuda: no CUDA GPU is visible .* use "
                                          r"--device cpu"):
        resolve_device("cuda")


def test_precision_auto_is_float32_on_cpu_and_names_map_to_autocast_dtypes():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype("float16", cpu) is torch.float16


@pytest.mark.parametrize("given, kept", [("bf16", "bfloat16"), ("fp16", "float16"),
                                         ("fp32", "float32"), ("auto", "auto")])
def test_old_dtype_spellings_still_work(given, kept):
    assert TrainConfig(dtype=given).dtype == kept


def test_unknown_choices_name_the_flag():
    with pytest.raises(ConfigError, match="--dtype must be one of auto, float32"):
        TrainConfig(dtype="int8")
    with pytest.raises(ConfigError, match="--device must be one of auto, cpu, cuda, mps"):
        TrainConfig(device="tpu")
