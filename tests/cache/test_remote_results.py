"""The results cache on remote checkpoints: keyed by the storage's content ids (HTTP ETag, S3
ETags of a listed folder); a rewritten object is computed again; an object whose storage gives
no content id is never cached."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

import dora_analysis as da
from tests.cache.test_results import computed, same  # noqa: F401 - the fixture
from tests.common import llama_state, perturb, write_sharded
from tests.io.test_remote import big_state, root, s3  # noqa: F401 - fixtures
from tests.servers import FileServer


@pytest.fixture
def files(tmp_path):
    base = llama_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(perturb(base, 0.02, seed=1), str(tmp_path / "tuned.safetensors"))
    return tmp_path


def test_http_files_by_their_etag(files, tmp_path, computed):  # noqa: F811
    with FileServer(files) as srv:
        urls = (f"{srv.url}/base.safetensors", f"{srv.url}/tuned.safetensors")
        first = da.analyze(*urls, cache=tmp_path / "c")
        assert computed() == 23
        same(da.analyze(*urls, cache=tmp_path / "c"), first)
        assert computed() == 0
        save_file(perturb(llama_state(0), 0.05, seed=7), str(files / "tuned.safetensors"))
        changed = da.analyze(*urls, cache=tmp_path / "c")  # same size, another ETag
        assert computed() == 23
        same(changed, da.analyze(*urls))


def test_no_content_id_no_cache(files, tmp_path, computed, monkeypatch):  # noqa: F811
    from dora_analysis.io import remote

    monkeypatch.setattr(remote, "content_version", lambda url, info: None)
    with FileServer(files) as srv:
        urls = (f"{srv.url}/base.safetensors", f"{srv.url}/tuned.safetensors")
        for _ in range(2):
            da.analyze(*urls, cache=tmp_path / "c")
            assert computed() == 23  # a rewrite could not be told: nothing served


def test_an_s3_folder_by_its_listing(root, s3, tmp_path, computed):  # noqa: F811
    pytest.importorskip("s3fs")
    import boto3

    first = da.analyze(root / "base.safetensors", f"{s3}/sharded/", cache=tmp_path / "c",
                       modules="q")
    n = computed()
    assert n == 3
    same(da.analyze(root / "base.safetensors", f"{s3}/sharded/", cache=tmp_path / "c",
                    modules="q"), first)
    assert computed() == 0
    other = tmp_path / "other"  # the same layout, other weights: each shard rewritten
    write_sharded(perturb(big_state(0), 0.03, seed=5), other, shards=3)
    for shard in sorted(other.glob("*.safetensors")):
        boto3.client("s3").upload_file(str(shard), "ckpts", f"sharded/{shard.name}")
    changed = da.analyze(root / "base.safetensors", f"{s3}/sharded/", cache=tmp_path / "c",
                         modules="q")
    assert computed() == n
    local = da.analyze(root / "base.safetensors", other, modules="q")
    numbers = ["name", "delta_m", "delta_d", "tangential_fraction"]
    same(changed[numbers], local[numbers])
