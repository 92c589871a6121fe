"""GGUF fine-tunes (llama.cpp) compared with a Hugging Face base: files written the way llama.cpp's
``convert_hf_to_gguf.py`` writes LLaMA weights (gguf's name map, the q/k row permutation, shapes
in ggml's ``ne`` order, F32/F16/BF16/Q8_0), against the same weights in safetensors."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.cli import main
from dora_analysis.errors import CheckpointFormatError
from dora_analysis.io.formats import CHECKPOINT_SUFFIXES, FILE_FORMATS, format_of
from dora_analysis.io.open import open_checkpoint

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, VOCAB = 96, 4, 2, 16, 160, 2, 50
NUMBERS = ["name", "axis", "delta_m", "delta_d", "mean_m0", "n_vectors", "dtype"]


def llama_weights(seed: int) -> dict[str, torch.Tensor]:
    """A LLaMA with grouped-query attention; every matrix non-square, inner sizes multiples of
    32 (Q8_0's block)."""
    g = torch.Generator().manual_seed(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"self_attn.q_proj": (q, HIDDEN), "self_attn.k_proj": (kv, HIDDEN),
              "self_attn.v_proj": (kv, HIDDEN), "self_attn.o_proj": (HIDDEN, q),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
              "mlp.down_proj": (HIDDEN, INTER)}
    state = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for layer in range(LAYERS):
        for module, shape in shapes.items():
            state[f"model.layers.{layer}.{module}.weight"] = torch.randn(*shape, generator=g) / 4
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{layer}.{norm}.weight"] = 1 + torch.randn(HIDDEN, generator=g) / 9
    state["model.norm.weight"] = torch.ones(HIDDEN)
    state["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g)
    return state


def tuned_weights(base: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.03 * torch.randn(v.shape, generator=g) * (1 + torch.arange(v.shape[0])
                                                               .reshape(-1, *[1] * (v.dim() - 1))
                                                               / v.shape[0])
            if v.dim() == 2 else v.clone() for k, v in base.items()}


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py (MIT licence), as it is."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def write_gguf(state: dict[str, torch.Tensor], path, qtype) -> None:
    """What convert_hf_to_gguf.py does for a LLaMA: architecture and head counts in the
    metadata, names through gguf's map, q/k permuted (``LlamaModel.modify_tensors``), 1-D
    tensors kept F32, matrices in ``qtype`` (quantized by gguf.quants, as the converter does)."""
    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_embedding_length(HIDDEN)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for name, tensor in state.items():
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = permute(data, HEADS, HEADS)
        if name.endswith("k_proj.weight"):
            data = permute(data, HEADS, KV_HEADS)
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new_name is not None, name
        if data.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(new_name, data.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(new_name, data.astype(np.float16))
        else:
            writer.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def as_read(state: dict[str, torch.Tensor], qtype) -> dict[str, torch.Tensor]:
    """The weights a GGUF of ``qtype`` holds, in Hugging Face's layout (quantized, then
    dequantized by gguf: the reference for what the reader must return)."""
    Q = gguf.GGMLQuantizationType
    out = {}
    for name, t in state.items():
        data = t.float().numpy()
        if data.ndim == 1 or qtype == Q.F32:
            out[name] = torch.from_numpy(data.copy())
        elif qtype == Q.F16:
            out[name] = torch.from_numpy(data.astype(np.float16))
        elif qtype == Q.BF16:
            out[name] = t.to(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(gguf.quants.dequantize(
                gguf.quants.quantize(data, qtype), qtype).copy())
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    base = llama_weights(0)
    save_file(base, str(root / "base.safetensors"))
    return root, base, tuned_weights(base)


def table(base, tuned) -> pd.DataFrame:
    t = da.analyze(base, tuned)
    return t[NUMBERS].sort_values(["name", "axis"]).reset_index(drop=True)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0"])
def test_a_gguf_fine_tune_reads_as_the_same_weights_in_safetensors(weights, qtype):
    root, base, tuned = weights
    q = gguf.GGMLQuantizationType[qtype]
    if qtype == "BF16":  # BF16 file and reference: the same bf16 values
        tuned = {k: v.to(torch.bfloat16).float() if v.dim() == 2 else v for k, v in tuned.items()}
    write_gguf(tuned, root / f"tuned.{qtype}.gguf", q)
    reference = as_read(tuned, q)
    save_file(reference, str(root / f"tuned.{qtype}.safetensors"))

    got = table(root / "base.safetensors", root / f"tuned.{qtype}.gguf")
    expected = table(root / "base.safetensors", root / f"tuned.{qtype}.safetensors")
    pd.testing.assert_frame_equal(got, expected, check_exact=True)  # the same bits in, same table
    assert len(got) == LAYERS * 7 + 2  # every matrix matched (embeddings and head too)

    with open_checkpoint(root / f"tuned.{qtype}.gguf",
                         base=open_checkpoint(root / "base.safetensors")) as src:
        assert sorted(src.keys()) == sorted(reference)
        for name, want in reference.items():
            assert src.info(name).shape == tuple(want.shape)
            assert torch.equal(src.get_tensor(name), want), name
            if want.dim() == 2:  # rows across the permutation's heads, one read
                assert torch.equal(src.get_rows(name, 3, 21), want[3:21]), name


def test_quantized_weights_give_the_table_to_the_quantization_precision(weights):
    root, base, tuned = weights
    write_gguf(tuned, root / "tuned.q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    save_file(tuned, str(root / "tuned.f32.safetensors"))
    got = table(root / "base.safetensors", root / "tuned.q8.gguf")
    exact = table(root / "base.safetensors", root / "tuned.f32.safetensors")
    # Q8_0: 8-bit values, one scale per 32: |error| ≤ scale/2 ≈ max|w|/254 per element
    assert np.allclose(got["delta_m"], exact["delta_m"], rtol=0.05, atol=2e-3)
    assert np.allclose(got["delta_d"], exact["delta_d"], rtol=0.05, atol=2e-3)


def test_without_undoing_the_permutation_q_and_k_would_not_match(weights, monkeypatch):
    from dora_analysis.io import gguf_file

    root, base, tuned = weights
    write_gguf(tuned, root / "tuned.perm.gguf", gguf.GGMLQuantizationType.F32)
    right = table(root / "base.safetensors", root / "tuned.perm.gguf")
    monkeypatch.setattr(gguf_file, "PERMUTED_ARCHS", frozenset())
    wrong = table(root / "base.safetensors", root / "tuned.perm.gguf")
    differs = right.name[(right.delta_m - wrong.delta_m).abs() > 1e-6].unique()
    assert differs.size and all("q_proj" in n or "k_proj" in n for n in differs)


def test_unpermute_inverts_the_converters_permutation():
    from dora_analysis.io.gguf_file import unpermute_rows

    for rows, heads in ((64, 4), (32, 2), (12, 3)):
        w = np.arange(rows * 5).reshape(rows, 5)
        assert np.array_equal(permute(w, heads, None)[unpermute_rows(rows, heads)], w)


def test_gguf_is_one_entry_of_the_format_table():
    assert format_of("model-Q8_0.gguf").name == "gguf"
    assert ".gguf" in CHECKPOINT_SUFFIXES
    assert [f.name for f in FILE_FORMATS].count("gguf") == 1


def test_planning_a_gguf_does_not_import_torch(weights, tmp_path):
    import subprocess

    root, _, tuned = weights
    write_gguf(tuned, tmp_path / "t.gguf", gguf.GGMLQuantizationType.F16)
    code = ("import sys, dora_analysis as da; "
            f"t = da.analyze({str(root / 'base.safetensors')!r}, {str(tmp_path / 't.gguf')!r}); "
            "print(len(t), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False", out.stdout


def test_a_broken_gguf_is_one_error_line(tmp_path, capsys, weights):
    root, _, _ = weights
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    assert main([str(root / "base.safetensors"), str(tmp_path / "bad.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.gguf: not a readable GGUF file" in err


def test_a_remote_gguf_says_to_download_it(weights):
    root, _, _ = weights
    from tests.servers import FileServer

    with FileServer(root) as srv, pytest.raises(CheckpointFormatError, match="download the file"):
        da.analyze(root / "base.safetensors", f"{srv.url}/tuned.F32.gguf")


def test_a_k_quant_is_dequantized_by_gguf_row_by_row(tmp_path):
    """gguf.quants cannot quantize K-quants, so the file holds Q4_K blocks of random codes (each
    block's two f16 scales set to small finite values); the reference is gguf's dequantization
    of the same blocks, put back in Hugging Face's row order."""
    Q = gguf.GGMLQuantizationType
    block, size = gguf.GGML_QUANT_SIZES[Q.Q4_K]
    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, head_dim = 256, 4, 2, 16
    shapes = {"model.layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
              "model.layers.0.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
              "model.layers.0.mlp.up_proj.weight": (3 * hidden // 2, hidden)}
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    base, reference = {}, {}
    for name, (rows, cols) in shapes.items():
        raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
        scales = raw.reshape(rows, -1, size)[:, :, :4].view(np.float16)
        scales[:] = rng.uniform(1e-3, 2e-2, size=scales.shape).astype(np.float16)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), raw, raw_dtype=Q.Q4_K)
        stored = gguf.quants.dequantize(raw, Q.Q4_K)
        heads_of = {"q_proj": heads, "k_proj": kv_heads}.get(name.split(".")[-2])
        if heads_of:  # stored rows are permuted: the HF row r lies at the unpermuted index
            from dora_analysis.io.gguf_file import unpermute_rows

            stored = stored[unpermute_rows(rows, heads_of)]
        reference[name] = torch.from_numpy(stored.copy())
        base[name] = reference[name] + 0.1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(reference, str(tmp_path / "ref.safetensors"))
    got = table(tmp_path / "base.safetensors", tmp_path / "k.gguf")
    expected = table(tmp_path / "base.safetensors", tmp_path / "ref.safetensors")
    pd.testing.assert_frame_equal(got, expected, check_exact=True)


@pytest.mark.parametrize("qtype", ["F32", "BF16"])
def test_q_and_k_biases_are_put_back_in_hugging_faces_row_order(tmp_path, qtype):
    """Qwen2-style attention biases: the converter permutes q/k biases as it permutes the
    weights, and a 1-D BF16 tensor is held by gguf as two bytes per value."""
    g = torch.Generator().manual_seed(3)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    state = {"model.layers.0.self_attn.q_proj.weight": torch.randn(q, HIDDEN, generator=g),
             "model.layers.0.self_attn.q_proj.bias": torch.randn(q, generator=g),
             "model.layers.0.self_attn.k_proj.weight": torch.randn(kv, HIDDEN, generator=g),
             "model.layers.0.self_attn.k_proj.bias": torch.randn(kv, generator=g)}
    if qtype == "BF16":  # values a bf16 file holds exactly
        state = {k: v.bfloat16().float() for k, v in state.items()}
    save_file(state, str(tmp_path / "base.safetensors"))
    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    for name, tensor in state.items():
        data = permute(tensor.numpy(), HEADS, HEADS if ".q_proj." in name else KV_HEADS)
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if qtype == "BF16":
            writer.add_tensor(new_name, gguf.quants.quantize(data, Q.BF16), raw_dtype=Q.BF16)
        else:
            writer.add_tensor(new_name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_checkpoint(tmp_path / "base.safetensors") as base, \
            open_checkpoint(tmp_path / "t.gguf", base=base) as src:
        for name, tensor in state.items():
            assert torch.equal(src.get_tensor(name).float(), tensor), name
