"""A checkpoint's identity changes whenever a file its readers open changes — touched, rewritten
with the same size and its modification time put back, replaced by a rename, rewritten within
one clock tick — and only then (a trainer's optimizer state is not read)."""

from __future__ import annotations

import os
import shutil

import pytest

from dora_analysis.cache import identity as ident
from dora_analysis.cache.identity import checkpoint_identity, content_digest, local_identity


@pytest.fixture
def folder(tmp_path):
    ck = tmp_path / "run" / "checkpoint-10"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"w" * 5000)
    (ck / "config.json").write_text("{}")
    return ck


def rewrite_keeping_times(path, data: bytes) -> None:
    """Same size, new bytes, in place; the modification time put back (``cp -p``-style)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size


def test_unchanged_files_keep_their_identity(folder):
    assert local_identity(folder) == local_identity(folder)
    assert local_identity(folder).unchanged()


@pytest.mark.parametrize("change", ["touch", "rewrite-same-size-mtime-kept", "rename-replace",
                                    "config", "new-shard", "removed"])
def test_every_change_changes_the_identity(folder, change):
    before = local_identity(folder)
    weights = folder / "model.safetensors"
    if change == "touch":
        os.utime(weights, ns=(0, os.stat(weights).st_mtime_ns + 1_000_000))
    elif change == "rewrite-same-size-mtime-kept":
        rewrite_keeping_times(weights, b"x" * 5000)
    elif change == "rename-replace":  # the same bytes and times, another inode
        st = os.stat(weights)
        shutil.copyfile(weights, folder / "new")
        os.utime(folder / "new", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(folder / "new", weights)
    elif change == "config":
        (folder / "config.json").write_text('{"a": 1}')
    elif change == "new-shard":
        (folder / "model-00002.safetensors").write_bytes(b"s")
    else:
        weights.unlink()
    assert local_identity(folder) != before
    # what is checked again before a result is stored: the files the run began with
    assert before.unchanged() is (change == "new-shard")


def test_a_same_size_rewrite_that_stat_cannot_see_is_caught_by_the_content(folder, monkeypatch):
    # Within one tick of the file system's clock a same-size rewrite keeps every stamp (even the
    # change time); stamps are forced equal here, as they would be then.
    fixed = ident.file_stamp(folder / "model.safetensors")
    monkeypatch.setattr(ident, "file_stamp",
                        lambda p: fixed if str(p).endswith("model.safetensors") else None)
    before = local_identity(folder)
    (folder / "model.safetensors").write_bytes(b"v" * 5000)
    assert local_identity(folder) != before


def test_large_files_are_sampled_and_still_see_a_rewrite(tmp_path, monkeypatch):
    monkeypatch.setattr(ident, "FULL_DIGEST_BYTES", 1 << 16)
    big = tmp_path / "big.safetensors"
    big.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    digest = content_digest(big, big.stat().st_size)
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 1  # one byte inside a sample
    big.write_bytes(bytes(data))
    assert content_digest(big, len(data)) != digest


def test_trainer_state_is_not_part_of_it_and_sidecars_are(folder):
    before = local_identity(folder)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 "training_args.bin"):
        (folder / name).write_bytes(b"state")
    assert local_identity(folder) == before  # never read by the analysis
    (folder.parent / "adapter_config.json").write_text("{}")  # a run's config, read for DCP
    assert local_identity(folder) != before
    base = folder.parent.parent / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"b")
    file_only = local_identity(base / "model.safetensors")
    (base / "config.json").write_text('{"tie_word_embeddings": true}')  # read beside a file
    assert local_identity(base / "model.safetensors") != file_only


def test_an_index_file_is_known_by_its_shards_too(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"a")
    before = checkpoint_identity(tmp_path / "model.safetensors.index.json")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"b")
    assert checkpoint_identity(tmp_path / "model.safetensors.index.json") != before
