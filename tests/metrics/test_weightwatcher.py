"""--weightwatcher: the columns are what WeightWatcher itself reports for the same layers of a
real torch model, joined by name; a missing library is one error naming the extra."""

from __future__ import annotations

import builtins
import math
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.errors import ConfigError
from dora_analysis.metrics.weightwatcher import esd_alpha

ww = pytest.importorskip("weightwatcher")


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.ReLU(),
                               torch.nn.Linear(160, 72), torch.nn.ReLU(),
                               torch.nn.Linear(72, 5))  # 5 eigenvalues: WeightWatcher skips it


def direct(module: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """WeightWatcher on the torch model itself: layer name → (α, α_weighted)."""
    frame = ww.WeightWatcher(model=module).analyze()
    return {str(r.name): (r.alpha, r.alpha_weighted) for r in frame.itertuples()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ww")
    base, tuned = model(0), model(0)
    with torch.no_grad():  # a heavy-tailed fine-tuning step on the first two layers
        g = torch.Generator().manual_seed(1)
        for layer in (tuned[0], tuned[2]):
            layer.weight.add_(0.05 * torch.distributions.StudentT(2.5).sample(
                layer.weight.shape) * torch.rand(layer.weight.shape, generator=g))
    for name, m in (("base", base), ("tuned", tuned)):
        save_file({k: v.contiguous() for k, v in m.state_dict().items()},
                  str(root / f"{name}.safetensors"))
    return root, base, tuned


def test_the_columns_are_weightwatchers_own_per_layer_alphas(pair):
    root, base, tuned = pair
    table = da.analyze(root / "base.safetensors", root / "tuned.safetensors",
                       weightwatcher=True)
    expected_base, expected_tuned = direct(base), direct(tuned)
    assert set(expected_base) == {"0", "2"}  # the 72 × 5 layer is skipped by the library
    for row in table.itertuples():
        layer = row.name.removesuffix(".weight")
        if layer not in expected_base:
            assert math.isnan(row.ww_alpha_base) and math.isnan(row.ww_alpha_tuned)
            continue
        assert (row.ww_alpha_base, row.ww_alpha_weighted_base) == pytest.approx(
            expected_base[layer], rel=1e-6)
        assert (row.ww_alpha_tuned, row.ww_alpha_weighted_tuned) == pytest.approx(
            expected_tuned[layer], rel=1e-6)
    assert table["ww_alpha_base"].notna().sum() == 2
    assert (table["ww_alpha_base"] != table["ww_alpha_tuned"]).sum() >= 2


def test_array_function_takes_numpy_and_torch_bf16():
    w = model(3)[0].weight.detach()
    a = esd_alpha(w.bfloat16(), "x.weight")
    b = esd_alpha(w.bfloat16().double().numpy(), "x")
    assert a == b and 1 < a[0] < 20
    assert all(math.isnan(v) for v in esd_alpha(np.full((40, 30), np.nan)))


def test_a_missing_library_is_one_error_naming_the_extra(pair, monkeypatch, capsys):
    root, _, _ = pair
    real_import, real_find = builtins.__import__, __import__("importlib.util").util.find_spec
    monkeypatch.delitem(sys.modules, "weightwatcher", raising=False)
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "weightwatcher" else real_find(name, *a))
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
        (_ for _ in ()).throw(ImportError(name)) if name == "weightwatcher"
        else real_import(name, *a, **k)))
    message = "--weightwatcher needs the weightwatcher package: pip install 'dora-analysis[ww]'"
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        da.analyze(root / "base.safetensors", root / "tuned.safetensors", weightwatcher=True)
    with pytest.raises(ConfigError, match="pip install 'dora-analysis"):
        esd_alpha(np.ones((20, 10)))
    from dora_analysis.cli import main

    out = root / "t.csv"
    assert main([str(root / "base.safetensors"), str(root / "tuned.safetensors"),
                 "--weightwatcher", "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n" and not out.exists()
