"""Hub references, offline: a hand-built cache exercises the real snapshot_download; the online
branch runs against a patched download function. Nothing reaches the internet."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.cli import main
from dora_analysis.errors import CheckpointNotFoundError
from dora_analysis.io import hub

SHA = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache, repo, files: dict, sha=SHA, ref="main"):
    """Lay out ``models--org--name/{refs,snapshots}`` as huggingface_hub does."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(sha)
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, snap / name) if not isinstance(src, str) else (snap / name).write_text(src)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def test_cached_full_model_offline(ckpts, cache):
    cached_repo(cache, "org/tuned", {"config.json": "{}", "model.safetensors": ckpts["tuned"]})
    table = da.analyze(ckpts["base"], "org/tuned")
    local = da.analyze(ckpts["base"], ckpts["tuned"])
    assert table[C.DELTA_D].tolist() == local[C.DELTA_D].tolist()
    assert set(table[C.REF]) == {f"org/tuned@{SHA}"} and set(table[C.CHECKPOINT]) == {"tuned"}


def test_revision_pinning_and_sharded_repo(ckpts, cache):
    files = {p.name: p for p in ckpts["sharded"].iterdir()}
    cached_repo(cache, "org/sharded", files, ref="v1")
    for ref in ("org/sharded@v1", f"org/sharded@{SHA}"):
        table = da.analyze(ckpts["base"], ref)
        assert len(table) == len(da.analyze(ckpts["base"], ckpts["sharded"]))


def test_cached_base_and_adapter(ckpts, cache, tmp_path):
    cached_repo(cache, "org/base", {"model.safetensors": ckpts["base"]})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{q}.lora_A.weight": torch.ones(2, 16), f"{q}.lora_B.weight": torch.ones(24, 2)},
              str(adapter / "adapter_model.safetensors"))
    cached_repo(cache, "org/adapter", {p.name: p for p in adapter.iterdir()})
    table = da.analyze("org/base", "org/adapter")
    assert len(table) == 1 and table[C.METHOD].item() == "lora"


def test_not_cached_offline(ckpts, cache):
    with pytest.raises(CheckpointNotFoundError, match="not in the local cache .* HF_HUB_OFFLINE"):
        da.analyze(ckpts["base"], "org/missing")


def test_cache_without_weights(ckpts, cache):
    cached_repo(cache, "org/empty", {"config.json": "{}"})
    with pytest.raises(CheckpointNotFoundError, match="no weights in the local cache"):
        da.analyze(ckpts["base"], "org/empty")


def test_local_path_wins(ckpts, cache, monkeypatch):
    monkeypatch.chdir(ckpts["root"])
    assert len(da.analyze("base.safetensors", "tuned_sharded")) > 0  # "tuned_sharded" is local


class FakeHub:
    """Stands in for the network: records calls, serves files from a folder or raises."""

    def __init__(self, tmp_path, files=None, error=None):
        self.calls, self.files, self.error = [], files or {}, error
        self.folder = tmp_path / "snapshots" / SHA

    def __call__(self, repo_id, **kwargs):
        self.calls.append((repo_id, kwargs))
        if self.error is not None:
            raise self.error
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, src in self.files.items():
            if any(__import__("fnmatch").fnmatch(name, p) for p in kwargs["allow_patterns"]):
                shutil.copy(src, self.folder / name)
        return str(self.folder)


def _http_error(cls, status):
    # Built without an HTTP response object: which HTTP library huggingface_hub uses varies.
    err = cls.__new__(cls)
    Exception.__init__(err, f"{status} error")
    return err


def test_online_download_fetches_only_needed_files(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    files = {p.name: p for p in ckpts["sharded"].iterdir()}
    files["pytorch_model.bin"] = ckpts["bin"] / "pytorch_model.bin"  # must not be fetched
    fake = FakeHub(tmp_path, files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert main([str(ckpts["base"]), "org/remote@main", "--token", "hf_secret", "-q"]) == 0
    patterns = [kw["allow_patterns"] for _, kw in fake.calls]
    assert patterns[0] == ["*.json"]
    assert patterns[1] == sorted(p.name for p in ckpts["sharded"].glob("*.safetensors"))
    assert all(kw["token"] == "hf_secret" and kw["revision"] == "main"
               and kw["local_files_only"] is False for _, kw in fake.calls)
    assert not (fake.folder / "pytorch_model.bin").exists()
    out = capsys.readouterr()
    assert "hf_secret" not in out.out + out.err


@pytest.mark.parametrize("error, match", [
    (_http_error(RepositoryNotFoundError, 404), "org/remote: no such repository"),
    (_http_error(RevisionNotFoundError, 404), "org/remote@v9: no such revision"),
    (_http_error(GatedRepoError, 403), "gated repository"),
])
def test_online_errors(ckpts, tmp_path, monkeypatch, capsys, error, match):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path, error=error))
    ref = "org/remote@v9" if "revision" in match else "org/remote"
    assert main([str(ckpts["base"]), ref]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_cache_location_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
