"""SVD helpers of the spectral metrics: the r × r core, Lanczos with products only, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dora_analysis as da
from dora_analysis.errors import ConfigError
from dora_analysis.metrics import linalg

CPU = torch.device("cpu")


def sines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """sin of the angle between matching unit columns (accurate where 1 − cos² is not)."""
    return np.linalg.norm(got - want * np.sum(got * want, axis=0), axis=0)


@pytest.mark.parametrize("out, inp, r", [(30, 12, 4), (12, 30, 4), (5, 40, 8), (40, 3, 6)])
def test_low_rank_svd_is_the_svd_of_s_b_a(out, inp, r):
    g = torch.Generator().manual_seed(out + inp)
    b = torch.randn(out, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, inp, generator=g, dtype=torch.float64)
    u, s, v = linalg.low_rank_svd(b, a, 0.25)
    dense = 0.25 * (b @ a).numpy()
    want = np.linalg.svd(dense, compute_uv=False)
    k = min(out, inp, r)
    assert s.shape == (k,)
    np.testing.assert_allclose(s.numpy(), want[:k], rtol=1e-10)
    np.testing.assert_allclose((u * s) @ v.T, dense, atol=1e-12 * np.abs(dense).max())
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-12)


def test_lanczos_matches_the_dense_svd_up_to_sign():
    g = np.random.default_rng(0)
    rows, cols = 150, 90  # large enough for Lanczos
    u, _ = np.linalg.qr(g.standard_normal((rows, cols)))
    v, _ = np.linalg.qr(g.standard_normal((cols, cols)))
    s = np.linspace(10, 1, cols) ** 2  # well separated at the top
    w = u @ np.diag(s) @ v.T
    top = linalg.top_left_singular_vectors(w, 10, CPU)
    assert top.vectors.shape == (rows, 10)
    np.testing.assert_allclose(np.abs(np.sum(top.vectors * u[:, :10], axis=0)), 1.0, atol=1e-9)
    assert (sines(top.vectors, u[:, :10]) <= top.angles + 1e-13).all()
    assert (top.angles < 1e-9).all()


def test_products_only_for_base_plus_low_rank():
    g = torch.Generator().manual_seed(1)
    for rows, cols in ((120, 80), (80, 120)):
        w0 = torch.randn(rows, cols, generator=g, dtype=torch.float64).numpy()
        b = 3 * torch.randn(rows, 4, generator=g, dtype=torch.float64).numpy()
        a = torch.randn(4, cols, generator=g, dtype=torch.float64).numpy()
        via_products = linalg.top_left_singular_vectors(None, 8, CPU, base=w0,
                                                        update=(b, a, 0.5))
        dense = np.linalg.svd(w0 + 0.5 * b @ a, full_matrices=False)[0][:, :8]
        cosines = np.abs(np.sum(via_products.vectors * dense, axis=0))
        np.testing.assert_allclose(cosines, 1.0, atol=1e-8)
        assert (sines(via_products.vectors, dense) <= via_products.angles + 1e-13).all()


def test_small_matrices_take_the_dense_path_and_k_is_clipped():
    w = torch.randn(6, 4, dtype=torch.float64).numpy()
    top = linalg.top_left_singular_vectors(w, 10, CPU)
    assert top.vectors.shape == (6, 4) and top.angles.shape == (4,)
    want = np.linalg.svd(w, full_matrices=False)[0]
    np.testing.assert_allclose(np.abs(np.sum(top.vectors * want, axis=0)), 1.0, atol=1e-12)


def test_devices_are_validated():
    assert linalg.resolve_device("cpu") == CPU
    for bad in ("tpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(ConfigError, match="--device must be cpu, cuda or cuda:N"):
            linalg.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            linalg.resolve_device("cuda")
    with pytest.raises(ValueError):
        linalg.device_name("gpu")
    assert linalg.device_name("cuda:1") == "cuda:1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_numbers(ckpts):
    cpu = da.analyze(ckpts["base"], ckpts["tuned"], spectrum=True, intruders=True,
                     svd_cache="none")
    gpu = da.analyze(ckpts["base"], ckpts["tuned"], spectrum=True, intruders=True,
                     svd_cache="none", device="cuda")
    for col in ("update_norm", "sigma_1", "effective_rank", "amplification"):
        np.testing.assert_allclose(gpu[col], cpu[col], rtol=1e-9)
    assert gpu["intruders"].tolist() == cpu["intruders"].tolist()
