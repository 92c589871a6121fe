"""LoRA/DoRA layers: parity with PEFT (forward, backward, merge) and the paper's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dora_analysis.training.layers import DoRALinear, LoRALinear

peft = pytest.importorskip("peft")
IN, OUT, R, ALPHA = 16, 24, 4, 8  # non-square


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.lin(x)


def make_pair(dora: bool, seed: int = 0, **kwargs):
    """Our layer and PEFT's, sharing W0, A, B and m."""
    torch.manual_seed(seed)
    model = Tiny()
    ours_base = copy.deepcopy(model.lin)
    cls = DoRALinear if dora else LoRALinear
    ours = cls(ours_base, R, ALPHA, **kwargs)
    with torch.no_grad():
        ours.lora_A.weight.normal_()
        ours.lora_B.weight.normal_(std=0.3)
        if dora:
            ours.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(OUT))
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=dora,
                             use_rslora=kwargs.get("rslora", False),
                             lora_dropout=kwargs.get("dropout", 0.0))
    theirs = peft.get_peft_model(model, config)
    layer = theirs.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if dora:
            layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    return ours, theirs, layer


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_backward_merge_match_peft(dora, rslora):
    ours, theirs, layer = make_pair(dora, rslora=rslora)
    x = torch.randn(5, 3, IN)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    (y_ours.square().sum()).backward()
    (y_theirs.square().sum()).backward()
    torch.testing.assert_close(ours.lora_A.weight.grad, layer.lora_A["default"].weight.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.lora_B.weight.grad, layer.lora_B["default"].weight.grad,
                               rtol=1e-4, atol=1e-5)
    if dora:
        torch.testing.assert_close(ours.lora_magnitude_vector.grad,
                                   layer.lora_magnitude_vector["default"].weight.grad,
                                   rtol=1e-4, atol=1e-5)
    ours.merge()
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(ours.base_layer.weight, merged.lin.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), y_ours, rtol=1e-5, atol=1e-5)  # merged = same outputs


def test_dropout_path_matches_peft_in_training_mode():
    ours, theirs, _ = make_pair(True, dropout=0.3)
    ours.train(), theirs.train()
    x = torch.randn(4, IN)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.manual_seed(7)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)


def test_starts_at_the_pretrained_weight():
    torch.manual_seed(1)
    base = nn.Linear(IN, OUT)
    x = torch.randn(3, IN)
    expected = base(x)
    for cls in (LoRALinear, DoRALinear):
        layer = cls(copy.deepcopy(base), R, ALPHA)
        torch.testing.assert_close(layer(x), expected)


def test_merged_dora_rows_have_the_magnitude_as_norm_and_unmerge_restores():
    ours, _, _ = make_pair(True)
    w0 = ours.base_layer.weight.detach().clone()
    ours.merge()
    torch.testing.assert_close(ours.base_layer.weight.norm(dim=1),
                               ours.lora_magnitude_vector.detach(), rtol=1e-5, atol=1e-6)
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, w0, rtol=1e-5, atol=1e-5)


def _grad_wrt_merged(layer: DoRALinear, x: torch.Tensor) -> torch.Tensor:
    """G = ∂L/∂W' for L = sum(y²), with W' the merged weight."""
    with torch.no_grad():
        v = layer.base_layer.weight + layer.delta_weight()
        w = layer.lora_magnitude_vector[:, None] * v / v.norm(dim=1, keepdim=True)
    w = w.clone().requires_grad_(True)
    nn.functional.linear(x, w, layer.base_layer.bias).square().sum().backward()
    return w.grad


@pytest.mark.parametrize("detach", [False, True])
def test_gradients_follow_eqs_6_7_and_11(detach):
    torch.manual_seed(3)
    layer = DoRALinear(nn.Linear(IN, OUT).double(), R, ALPHA, detach_norm=detach)
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_(std=0.3)
        layer.lora_magnitude_vector.mul_(1.2)
    x = torch.randn(6, IN, dtype=torch.float64)
    g = _grad_wrt_merged(layer, x)  # (out, in), one row per output channel
    layer(x).square().sum().backward()
    with torch.no_grad():
        v = layer.base_layer.weight + layer.delta_weight()
        c = v.norm(dim=1, keepdim=True)
        m = layer.lora_magnitude_vector[:, None]
        # Eq. 7 (row form): ∇m L = (G · V') / ||V'||
        torch.testing.assert_close(layer.lora_magnitude_vector.grad, ((g * v).sum(1) / c[:, 0]))
        if detach:  # Eq. 11: ∇V' L = (m / C) G
            grad_v = m / c * g
        else:  # Eq. 6: ∇V' L = (m / ||V'||) (I − V'V'ᵀ/||V'||²) G, per output channel
            grad_v = m / c * (g - (g * v).sum(1, keepdim=True) * v / c.square())
        s = layer.scaling
        torch.testing.assert_close(layer.lora_B.weight.grad, s * grad_v @ layer.lora_A.weight.T)
        torch.testing.assert_close(layer.lora_A.weight.grad, s * layer.lora_B.weight.T @ grad_v)


def test_magnitude_only_trains_just_the_magnitude():
    layer = DoRALinear(nn.Linear(IN, OUT), R, ALPHA, magnitude_only=True)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_magnitude_vector"]
