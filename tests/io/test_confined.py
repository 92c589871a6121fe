"""Every file a checkpoint names (or holds under a fixed name) is confined to its folder, for every
format: hostile names and symbolic links are refused before anything outside is opened, and the
refusal never says whether the outside file exists. The Hugging Face cache's own links into its
``blobs/`` still read."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.cli import main
from dora_analysis.errors import UnsafeCheckpointError
from dora_analysis.io.dcp import read_metadata
from dora_analysis.io.guard import confined, confined_name
from dora_analysis.io.open import ReadOptions, open_checkpoint
from dora_analysis.io.remote import Url
from tests.common import llama_state, perturb, write_sharded
from tests.servers import FakeHub, FileServer

#: Paths opened by this process while recording (Python's audit events: ``open``, ``os.open``).
_OPENED: list[str] | None = None


def _record(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_record)


@pytest.fixture
def opened():
    """The real paths of the files opened during the test."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.fixture
def place(tmp_path) -> dict[str, Path]:
    """A base, a checkpoint folder to fill with hostile names, and valid weights outside it."""
    base = llama_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    outside = tmp_path / "outside"
    outside.mkdir()
    tuned = perturb(base, 0.02, seed=1)
    save_file(tuned, str(outside / "tuned.safetensors"))
    torch.save(tuned, outside / "pytorch_model.bin")
    return {"base": tmp_path / "base.safetensors", "ckpt": tmp_path / "ckpt",
            "outside": outside, "tuned": tuned}


def refused(base: Path, tuned: Path, opened: list[str], outside: Path) -> str:
    """Analysing ``tuned`` is refused as unsafe without opening anything under ``outside``."""
    opened.clear()  # what the test's own setup wrote
    with pytest.raises(UnsafeCheckpointError) as info:
        da.analyze(base, tuned)
    assert not [p for p in opened if p.startswith(os.path.realpath(outside))], opened
    return str(info.value)


# -- the rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../tuned.safetensors", "/etc/passwd", "a/../../x", "..",
                                  "C:\\x", "%2e%2e/x", "x?y", "x#y", "a\\..\\x", "", " ", "a\0b",
                                  3, None])
def test_names_that_may_leave_the_folder(name):
    assert confined_name(name) is not None
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        confined("ckpt", name, named_by="ckpt/index.json")


@pytest.mark.parametrize("name", ["model.safetensors", "sub/__0_0.distcp", "./global_step10",
                                  "model-00001-of-00002.safetensors"])
def test_plain_names_stay(name):
    assert confined_name(name) is None
    assert confined("ckpt", name, named_by="ckpt") == Path("ckpt") / name


def test_links_inside_the_folder_are_followed(place):
    folder = place["ckpt"]
    (folder / "real").mkdir(parents=True)
    shutil.copy(place["outside"] / "tuned.safetensors", folder / "real" / "w.safetensors")
    (folder / "model.safetensors").symlink_to("real/w.safetensors")
    table = da.analyze(place["base"], folder)
    expected = da.analyze(place["base"], place["outside"] / "tuned.safetensors")
    assert table["delta_d"].tolist() == expected["delta_d"].tolist()


def test_a_path_the_user_gives_is_read_wherever_it_leads(place, tmp_path):
    (tmp_path / "link.safetensors").symlink_to(place["outside"] / "tuned.safetensors")
    assert len(da.analyze(place["base"], tmp_path / "link.safetensors"))


# -- shard indexes (safetensors and .bin) ----------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("how", ["climbs", "absolute", "link"])
def test_shard_index_naming_a_file_outside(place, opened, kind, how):
    folder = place["ckpt"]
    write_sharded(place["tuned"], folder)
    target = place["outside"] / ("tuned.safetensors" if kind == "safetensors"
                                 else "pytorch_model.bin")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    if kind == "bin":
        for file in folder.glob("*.safetensors"):
            file.unlink()
        for name in set(index["weight_map"].values()):
            torch.save(place["tuned"], folder / name.replace(".safetensors", ".bin"))
        index["weight_map"] = {k: v.replace(".safetensors", ".bin")
                               for k, v in index["weight_map"].items()}
        shard = shard.replace(".safetensors", ".bin")
        (folder / "model.safetensors.index.json").unlink()
    name = {"climbs": f"../outside/{target.name}", "absolute": str(target), "link": shard}[how]
    if how == "link":
        (folder / shard).unlink()
        (folder / shard).symlink_to(target)
    else:
        index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json" if kind == "bin"
     else folder / "model.safetensors.index.json").write_text(json.dumps(index))
    err = refused(place["base"], folder, opened, place["outside"])
    if how == "link":
        assert "a symbolic link that leads out of the checkpoint folder" in err
        assert str(place["outside"]) not in err  # where it leads is not told
    else:
        assert "must be shard file names beside the index" in err


def test_model_folder_file_linking_out(place, opened):
    folder = place["ckpt"]
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(place["outside"] / "tuned.safetensors")
    err = refused(place["base"], folder, opened, place["outside"])
    assert "ckpt/model.safetensors: a symbolic link that leads out" in err
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").symlink_to(place["outside"] / "pytorch_model.bin")
    refused(place["base"], folder, opened, place["outside"])


# -- DCP ---------------------------------------------------------------------------------------


def _dcp(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": state}, checkpoint_id=folder)
    return folder


@pytest.mark.parametrize("how", ["absolute", "climbs", "link", "metadata link", "trainer link"])
def test_dcp_naming_a_file_outside(place, opened, how):
    """``storage_data``'s ``relative_path`` is a name like any other (torch's own reader would
    follow it: ``os.path.join(folder, "/abs")`` is ``/abs``)."""
    outside = _dcp(place["tuned"], place["outside"] / "dcp")
    folder = _dcp(perturb(place["tuned"], 0.01, seed=5), place["ckpt"])
    (distcp,) = sorted(p.name for p in folder.glob("*.distcp"))
    if how in ("absolute", "climbs"):
        target = {"absolute": str(outside / distcp), "climbs": f"../outside/dcp/{distcp}"}[how]
        metadata = read_metadata(folder)
        metadata.storage_data = {k: dataclasses.replace(v, relative_path=target)
                                 for k, v in metadata.storage_data.items()}
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
        assert "names" in refused(place["base"], folder, opened, place["outside"])
    elif how == "link":
        (folder / distcp).unlink()
        (folder / distcp).symlink_to(outside / distcp)
        refused(place["base"], folder, opened, place["outside"])
    elif how == "metadata link":
        (folder / ".metadata").unlink()
        (folder / ".metadata").symlink_to(outside / ".metadata")
        refused(place["base"], folder, opened, place["outside"])
    else:  # HF Trainer's checkpoint-N/pytorch_model_fsdp_0, a link out of checkpoint-N/
        step = place["ckpt"].parent / "run" / "checkpoint-3"
        step.mkdir(parents=True)
        (step / "pytorch_model_fsdp_0").symlink_to(outside, target_is_directory=True)
        refused(place["base"], step, opened, place["outside"])


# -- DeepSpeed ---------------------------------------------------------------------------------


@pytest.fixture
def zero_folder(tmp_path) -> Path:
    """A ZeRO-2 save as DeepSpeed lays it out (``latest`` + ``global_step1/``), with a module of
    the tuned weights (the names are what the checks look at; see test_deepspeed for DeepSpeed's
    own files)."""
    def save(folder: Path, state: dict) -> Path:
        step = folder / "global_step1"
        step.mkdir(parents=True)
        torch.save({"module": state}, step / "mp_rank_00_model_states.pt")
        (folder / "latest").write_text("global_step1")
        return folder
    return save


@pytest.mark.parametrize("how", ["tag climbs", "tag absolute", "latest link", "step link",
                                 "model states link"])
def test_deepspeed_naming_a_file_outside(place, opened, zero_folder, how):
    outside = zero_folder(place["outside"] / "ds", place["tuned"])
    folder = zero_folder(place["ckpt"], perturb(place["tuned"], 0.01, seed=5))
    assert len(da.analyze(place["base"], folder))  # valid as laid out
    if how.startswith("tag"):
        tag = "../outside/ds/global_step1" if how == "tag climbs" else str(outside / "global_step1")
        (folder / "latest").write_text(tag)
    elif how == "latest link":  # its text would be shown in an error: never read it
        (place["outside"] / "secret").write_text("hunter2")
        (folder / "latest").unlink()
        (folder / "latest").symlink_to(place["outside"] / "secret")
    elif how == "step link":
        shutil.rmtree(folder / "global_step1")
        (folder / "global_step1").symlink_to(outside / "global_step1", target_is_directory=True)
    else:
        states = folder / "global_step1" / "mp_rank_00_model_states.pt"
        states.unlink()
        states.symlink_to(outside / "global_step1" / "mp_rank_00_model_states.pt")
    err = refused(place["base"], folder, opened, place["outside"])
    assert "hunter2" not in err


# -- the Hugging Face cache: its own links into blobs/ are read --------------------------------


def test_a_real_hub_cache_snapshot_reads_through_its_links(place, tmp_path, monkeypatch):
    """``snapshot_download`` (from a loopback fake Hub) lays files out as links from
    ``snapshots/<rev>/`` to ``../../blobs/<hash>``: those are inside the repo's cache."""
    import huggingface_hub

    repo = tmp_path / "hub" / "org" / "sharded"
    write_sharded(place["tuned"], repo, shards=2)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub(tmp_path / "hub") as hub:
        huggingface_hub.snapshot_download("org/sharded", cache_dir=tmp_path / "cache",
                                          endpoint=hub.url)
    snapshot = next((tmp_path / "cache").glob("models--org--sharded/snapshots/*"))
    assert all(p.is_symlink() for p in snapshot.iterdir())  # the layout this test is about
    table = da.analyze(place["base"], "org/sharded")  # offline, from that cache
    local = da.analyze(place["base"], repo)
    assert table["delta_d"].tolist() == local["delta_d"].tolist()


# -- remote shard indexes ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../tuned.safetensors", "%2e%2e/tuned.safetensors",
                                  "OTHER/tuned.safetensors", "/tuned.safetensors"])
def test_remote_index_naming_a_file_outside(place, tmp_path, name):
    root = tmp_path / "served"
    write_sharded(place["tuned"], root / "sharded", shards=2)
    save_file(place["tuned"], str(root / "tuned.safetensors"))
    index_path = root / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    with FileServer(root) as srv, FileServer(root) as other:
        name = name.replace("OTHER", other.url)  # an absolute URL on another host
        index["weight_map"] = {k: name if v == first else v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        with pytest.raises(UnsafeCheckpointError, match="must be shard file names"):
            open_checkpoint(Url(f"{srv.url}/sharded/model.safetensors.index.json"),
                            ReadOptions())
        assert not other.requests
        assert all(path.startswith("/sharded/") for _, path, _ in srv.requests)


def test_one_error_line_in_the_cli(place, capsys, tmp_path):
    folder = _dcp(place["tuned"], place["ckpt"])
    metadata = read_metadata(folder)
    metadata.storage_data = {k: dataclasses.replace(v, relative_path="/etc/passwd")
                             for k, v in metadata.storage_data.items()}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    out = tmp_path / "out" / "t.csv"
    out.parent.mkdir()
    assert main([str(place["base"]), str(folder), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "/etc/passwd" in err
    assert "ckpt/.metadata: names '/etc/passwd' (an absolute path)" in err
    assert not any(out.parent.iterdir())


# -- adapter folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("linked", ["adapter_model.safetensors", "adapter_config.json"])
def test_adapter_folder_files_linking_out(place, opened, linked):
    """An adapter folder's config and weights are its files like any other's (PEFT's layout;
    the config names no file that is read: ``base_model_name_or_path`` is only quoted)."""
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    weights = {f"{q}.lora_A.weight": torch.randn(2, 16, generator=g),
               f"{q}.lora_B.weight": torch.randn(24, 2, generator=g)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": str(place["outside"] / "tuned.safetensors")}
    for folder in (place["ckpt"], place["outside"] / "adapter"):
        folder.mkdir()
        save_file(weights, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(config))
    assert len(da.analyze(place["base"], place["ckpt"]))  # valid as laid out
    (place["ckpt"] / linked).unlink()
    (place["ckpt"] / linked).symlink_to(place["outside"] / "adapter" / linked)
    err = refused(place["base"], place["ckpt"], opened, place["outside"])
    assert f"ckpt/{linked}: a symbolic link that leads out" in err
