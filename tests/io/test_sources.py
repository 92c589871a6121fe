"""Lazy sources: safetensors (single, sharded), PyTorch pickles (weights_only), folder layouts."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigError,
    UnsafeCheckpointError,
)
from dora_analysis.io.open import open_source

NAME = "model.layers.1.mlp.down_proj.weight"


def test_safetensors_reads_rows_lazily(ckpts):
    with open_source(ckpts["base"]) as src:
        full = src.get_tensor(NAME)
        assert full.shape == (16, 40)
        assert torch.equal(src.get_rows(NAME, 3, 7), full[3:7])
        info = src.info(NAME)
        assert info.shape == (16, 40) and info.dtype == "float32" and info.is_matrix
        assert not src.info("model.rotary.position_ids").is_matrix  # int buffer


@pytest.mark.parametrize("layout", ["base", "sharded"])
def test_pread_reads_the_same_rows_as_mmap(ckpts, layout):
    with open_source(ckpts[layout], "pread") as pread, open_source(ckpts[layout]) as mmap:
        for name in mmap.keys():
            rows = mmap.info(name).shape[0]
            for start, stop in ((0, rows), (1, max(1, rows - 1)), (rows - 1, rows + 5)):
                assert torch.equal(pread.get_rows(name, start, stop),
                                   mmap.get_rows(name, start, stop))


def test_unknown_io_backend(ckpts):
    with pytest.raises(ConfigError, match="--io"):
        open_source(ckpts["base"], "uring")


def test_sharded_matches_single(ckpts):
    with open_source(ckpts["sharded"]) as sharded, open_source(ckpts["tuned"]) as single:
        assert sorted(sharded.keys()) == sorted(single.keys())
        for name in single.keys():
            assert torch.equal(sharded.get_tensor(name), single.get_tensor(name))
            assert torch.equal(sharded.get_rows(name, 0, 1), single.get_rows(name, 0, 1))


def test_bin_folder_matches_safetensors(ckpts):
    with open_source(ckpts["bin"]) as pt, open_source(ckpts["tuned"]) as st:
        assert torch.equal(pt.get_tensor(NAME), st.get_tensor(NAME))
        assert pt.info(NAME).shape == (16, 40)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoint_wrappers_are_unwrapped(tmp_path, wrapper):
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: {"w.weight": torch.ones(2, 3)}, "epoch": 3}, path)
    with open_source(path) as src:
        assert src.keys() == ["w.weight"]


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"w.weight": Evil()}, f)
    with pytest.raises(UnsafeCheckpointError, match="refused to unpickle"):
        open_source(path)
    assert not marker.exists()

    zipped = tmp_path / "evil.pt"
    torch.save({"w.weight": torch.ones(2, 2), "x": Evil()}, zipped)
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeCheckpointError):
        open_source(zipped)
    assert not marker.exists()


def test_truncated_safetensors(tmp_path, ckpts):
    data = ckpts["base"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="cut.safetensors"):
        src = open_source(path)
        for name in src.keys():
            src.get_tensor(name)


def test_random_bytes(tmp_path):
    for suffix in (".safetensors", ".bin"):
        path = tmp_path / f"noise{suffix}"
        path.write_bytes(bytes(range(256)) * 7)
        with pytest.raises(CheckpointFormatError, match=f"noise{suffix}"):
            open_source(path)


def test_missing_and_empty(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        open_source(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointFormatError, match="no checkpoint found"):
        open_source(tmp_path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint file type"):
        open_source(path)


def test_index_with_missing_shard(tmp_path):
    save_file({"a.weight": torch.ones(2, 2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00002"):
        open_source(tmp_path)


def test_broken_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="shard index"):
        open_source(tmp_path)


def test_single_unnamed_safetensors_in_folder(tmp_path):
    save_file({"a.weight": torch.ones(2, 2)}, str(tmp_path / "consolidated.safetensors"))
    with open_source(tmp_path) as src:
        assert src.keys() == ["a.weight"]


def test_adapter_folder_is_refused_clearly(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="adapter"):
        open_source(tmp_path)
