"""Adapters on Conv1d, Conv2d, transformers Conv1D and Embedding, LoRA and DoRA: PEFT loads the
saved folder with exactly our tensors and gives the same outputs, gradients and merged weights."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dora_analysis.training.config import TrainConfig
from dora_analysis.training.inject import (
    adapter_state_dict,
    inject_adapters,
    merge_adapters,
    uses_fan_in_fan_out,
)
from dora_analysis.training.layers import DoRALayer
from dora_analysis.training.loop import peft_adapter_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
R, ALPHA = 3, 5.0


class Wrap(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m(x)


def conv1d_gpt2():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(10, 6)  # nf=out=10, nx=in=6: weight stored (6, 10)
    nn.init.normal_(layer.weight, std=0.3)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


# (name, module factory, input factory); every weight non-square.
KINDS = {
    "conv1d": (lambda: nn.Conv1d(6, 10, 3, padding=1), lambda g: torch.randn(2, 6, 9, generator=g)),
    "conv2d": (lambda: nn.Conv2d(4, 10, (3, 2), stride=2, padding=1),
               lambda g: torch.randn(2, 4, 7, 6, generator=g)),
    "conv2d_1x1": (lambda: nn.Conv2d(4, 7, 1), lambda g: torch.randn(2, 4, 5, 3, generator=g)),
    "gpt2_conv1d": (conv1d_gpt2, lambda g: torch.randn(2, 5, 6, generator=g)),
    "embedding": (lambda: nn.Embedding(30, 12, padding_idx=0),
                  lambda g: torch.randint(0, 30, (2, 7), generator=g)),
}


def make(kind: str, method: str, tmp_path):
    """Our adapted model with random factors, its saved folder, and PEFT's model loaded from it."""
    factory, inputs = KINDS[kind]
    torch.manual_seed(0)
    base = Wrap(factory())
    ours = copy.deepcopy(base)
    inject_adapters(ours, targets=["m"], method=method, rank=R, alpha=ALPHA)
    with torch.no_grad():  # training moves every factor away from its zero initialisation
        for name, param in ours.named_parameters():
            if "magnitude" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
            elif "lora_" in name:
                param.normal_(std=0.4)
    folder = tmp_path / f"{kind}-{method}"
    folder.mkdir()
    saved = adapter_state_dict(ours)
    save_file(saved, str(folder / "adapter_model.safetensors"))
    cfg = TrainConfig(method=method, targets=("m",), rank=R, alpha=ALPHA, steps=1)
    (folder / "adapter_config.json").write_text(
        json.dumps(peft_adapter_config(cfg, uses_fan_in_fan_out(ours))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    return ours, theirs, saved, inputs(torch.Generator().manual_seed(1))


def ours_name(peft_name: str) -> str:
    """PEFT's parameter name → ours (no adapter name, magnitude a bare parameter)."""
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_peft_loads_the_same_tensors_and_computes_the_same(kind, method, tmp_path):
    ours, theirs, saved, x = make(kind, method, tmp_path)
    theirs_saved = peft.get_peft_model_state_dict(theirs)
    assert sorted(theirs_saved) == sorted(saved)  # no missing, no unexpected keys
    for key, value in saved.items():
        torch.testing.assert_close(theirs_saved[key], value, rtol=0, atol=0, msg=key)
    if method == "dora":
        assert isinstance(ours.m, DoRALayer)
    ours.train(), theirs.train()
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    grads = {ours_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(ours_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    ours.eval()
    with torch.no_grad():
        before = ours(x)
        merge_adapters(ours)
        merged = theirs.merge_and_unload()
        torch.testing.assert_close(ours.m.base_layer.weight, merged.m.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv2d", "gpt2_conv1d", "embedding"])
def test_dora_magnitude_has_pefts_shape_and_is_the_norm_of_each_output_channel(kind, tmp_path):
    ours, _, saved, _ = make(kind, "dora", tmp_path)
    magnitude = saved["base_model.model.m.lora_magnitude_vector"]
    weight = ours.m.base_layer.weight.detach()
    expected = {  # Eq. 2 per output channel, in PEFT's storage shape
        "conv2d": weight.flatten(1).norm(dim=1).reshape(1, -1, 1, 1),
        "gpt2_conv1d": weight.norm(dim=0),  # stored (in, out): a column per output
        "embedding": weight.norm(dim=0),  # (num, dim): one per embedding dimension
    }[kind]
    assert magnitude.shape == expected.shape
    with torch.no_grad():
        ours.m.merge()
        merged = ours.m.base_layer.weight
        norms = {"conv2d": merged.flatten(1).norm(dim=1), "gpt2_conv1d": merged.norm(dim=0),
                 "embedding": merged.norm(dim=0)}[kind]
    torch.testing.assert_close(norms, magnitude.reshape(-1), rtol=1e-5, atol=1e-6)


def test_adapters_start_at_the_pretrained_layer():
    g = torch.Generator().manual_seed(2)
    for kind, (factory, inputs) in KINDS.items():
        for method in ("lora", "dora"):
            torch.manual_seed(3)
            model = Wrap(factory())
            x = inputs(g)
            expected = model(x)
            inject_adapters(model, targets=["m"], method=method, rank=R, alpha=ALPHA)
            torch.testing.assert_close(model(x), expected, msg=f"{kind} {method}")


def test_grouped_convolution_is_refused_with_its_name():
    model = Wrap(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"m: adapters on Conv2d need a plain convolution "
                                         r"\(got groups=2\)"):
        inject_adapters(model, targets=["m"], method="dora", rank=2, alpha=4)


def test_a_matched_module_that_cannot_take_adapters_is_named():
    model = nn.Sequential()
    model.add_module("norm", nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"cannot take adapters: norm \(LayerNorm\)"):
        inject_adapters(model, targets=["norm"], method="lora", rank=2, alpha=4)
