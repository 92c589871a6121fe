"""Fuzzing the reader: mutated safetensors headers and bytes only ever raise our own errors."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import dora_analysis as da
from dora_analysis.errors import DoraAnalysisError
from dora_analysis.io.open import open_source

STATE = {"model.layers.0.self_attn.q_proj.weight": torch.randn(6, 4),
         "model.layers.0.mlp.up_proj.weight": torch.randn(3, 5).bfloat16(),
         "model.norm.weight": torch.ones(4)}
GOOD = save(STATE)
HEADER_LEN = struct.unpack("<Q", GOOD[:8])[0]
HEADER = json.loads(GOOD[8 : 8 + HEADER_LEN])


def exercise(path, base):
    """Everything a user's run does with a file; returns normally or raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in ("mmap", "pread"):
            with open_source(path, backend) as src:
                for name in src.keys():
                    info = src.info(name)
                    src.get_tensor(name)
                    if info.shape:
                        src.get_rows(name, 0, info.shape[0])
        da.analyze(base, path, axis="both")


def check(data: bytes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    base = folder / "base.safetensors"
    base.write_bytes(GOOD)
    path = folder / "mutant.safetensors"
    path.write_bytes(data)
    try:
        exercise(path, base)
    except DoraAnalysisError:
        pass  # a clear, named error: what we want
    assert base.read_bytes() == GOOD and path.read_bytes() == data  # inputs untouched


FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)),
                      min_size=1, max_size=6))
def test_byte_mutations(tmp_path_factory, edits):
    data = bytearray(GOOD)
    for pos, value in edits:
        data[pos] = value
    check(bytes(data), tmp_path_factory)


@FUZZ
@given(cut=st.integers(0, len(GOOD) - 1))
def test_truncations(tmp_path_factory, cut):
    check(GOOD[:cut], tmp_path_factory)


header_values = st.one_of(
    st.sampled_from(["F32", "BF16", "F16", "F64", "I8", "U8", "F8_E4M3", "BOOL", "XX", ""]),
    st.lists(st.integers(-2, 2**40), max_size=4),
    st.integers(-(2**63), 2**64), st.none(), st.text(max_size=5),
)


@FUZZ
@given(tensor=st.sampled_from(sorted(k for k in HEADER if k != "__metadata__")),
       field=st.sampled_from(["dtype", "shape", "data_offsets"]), value=header_values,
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]))
def test_header_mutations(tmp_path_factory, tensor, field, value, length_delta):
    header = json.loads(json.dumps(HEADER))
    header[tensor][field] = value
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + GOOD[8 + HEADER_LEN :]
    check(data, tmp_path_factory)


def test_clean_file_analyses(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(GOOD)
    assert len(da.analyze(tmp_path / "a.safetensors", tmp_path / "a.safetensors")) == 2


@pytest.mark.parametrize("name", ["fuzz_gap.safetensors"])
def test_gap_in_offsets(tmp_path, name):
    header = json.loads(json.dumps(HEADER))
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [o + 4 for o in header[first]["data_offsets"]]
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + GOOD[8 + HEADER_LEN :] + b"\0" * 4
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DoraAnalysisError):
        exercise(tmp_path / name, tmp_path / name)
