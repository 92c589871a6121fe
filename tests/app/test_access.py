"""What a dashboard visitor may read: everything locally; under the data root only (``..`` and
links included) when one is named; no typed path when served without one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dora_analysis.app import access as policy
from dora_analysis.app.access import Access, AccessError

testing = pytest.importorskip("streamlit.testing.v1")
APP = Path(policy.__file__).parent


@pytest.fixture
def root(tmp_path, ckpts):
    """A data root with a checkpoint, a series, and links pointing in and out."""
    root = tmp_path / "data"
    (root / "run").mkdir(parents=True)
    (root / "base.safetensors").write_bytes(ckpts["base"].read_bytes())
    (root / "run" / "inner.safetensors").symlink_to(root / "base.safetensors")
    (root / "escape.safetensors").symlink_to(ckpts["tuned"])  # outside the root
    (root / "leaky").mkdir()
    (root / "leaky" / "model.safetensors").symlink_to(ckpts["tuned"])
    (root / "outdir").symlink_to(ckpts["series"])  # a folder outside
    (root / "indir").symlink_to(root / "leaky")  # a folder inside, holding a link out
    return root


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
    ("", False), (None, False), ("0.0.0.0", False), ("192.0.2.2", False), ("::", False)])
def test_loopback_addresses(address, loopback):
    assert policy.is_loopback(address) is loopback


def test_local_use_reads_what_the_cli_reads(ckpts):
    access = Access.from_settings("127.0.0.1", env={}, argv=[])
    assert not access.confined and access.describe() is None
    assert access.resolve(f" {ckpts['base']} ").ref == str(ckpts["base"])
    assert access.resolve("org/model@main").ref == "org/model@main"
    with pytest.raises(AccessError, match="give a path"):
        access.resolve("  ")  # not the server's working folder


def test_paths_inside_the_root(root):
    access = Access.from_settings("0.0.0.0", env={"DORA_DASHBOARD_ROOT": str(root)})
    assert access.confined and access.served
    assert access.resolve("base.safetensors").ref == str(root / "base.safetensors")
    assert access.resolve(str(root / "run")).ref == str(root / "run")  # absolute, inside
    assert access.resolve("run/inner.safetensors").ref == str(root / "base.safetensors")
    assert access.resolve("run/../base.safetensors").ref == str(root / "base.safetensors")


@pytest.mark.parametrize("typed", [
    "../../etc/passwd", "/etc/passwd", "run/../..", "escape.safetensors", "outdir",
    "nothing-here.safetensors"])
def test_paths_outside_the_root_are_refused_like_missing_ones(root, typed):
    access = Access.from_settings("0.0.0.0", argv=["--root", str(root)], env={})
    with pytest.raises(AccessError, match=f"^{typed}: no such file or folder under the data root$"):
        access.resolve(typed)
    # a path outside that looks like a Hub id says nothing about what exists outside either
    with pytest.raises(AccessError, match="not under the data root, and Hub ids are off"):
        access.resolve("outdir/checkpoint-10")


@pytest.mark.parametrize("typed", ["leaky", "indir", "."])
def test_folders_holding_links_out_are_refused(root, typed):
    access = Access.from_settings("127.0.0.1", env={"DORA_DASHBOARD_ROOT": str(root)})
    with pytest.raises(AccessError, match="holds a link that leads outside the data root"):
        access.resolve(typed)


def test_hub_ids_only_where_the_owner_allows(root):
    confined = Access.from_settings("0.0.0.0", env={"DORA_DASHBOARD_ROOT": str(root)})
    with pytest.raises(AccessError, match="Hub ids are off on this server"):
        confined.resolve("org/model@main")
    allowed = Access.from_settings("0.0.0.0", env={"DORA_DASHBOARD_ROOT": str(root),
                                                   "DORA_DASHBOARD_HUB": "1"})
    assert allowed.resolve("org/model@main").ref == "org/model@main"


def test_served_without_a_root_reads_no_typed_path(ckpts):
    access = Access.from_settings("0.0.0.0", env={}, argv=[])
    assert "typed paths are off" in access.describe()
    with pytest.raises(AccessError, match="no data root is named"):
        access.resolve(str(ckpts["base"]))


def test_a_root_that_is_not_a_folder(tmp_path):
    with pytest.raises(AccessError, match="is not a folder"):
        Access.from_settings("127.0.0.1", env={"DORA_DASHBOARD_ROOT": str(tmp_path / "no")})


def run_data_page(monkeypatch, base: str, tuned: str):
    at = testing.AppTest.from_file(str(APP / "views" / "data.py"), default_timeout=60).run()
    at.text_input[0].input(base)
    at.text_area[0].input(tuned)
    at.text_input[1].input("q")
    next(b for b in at.button if b.label == "Run analysis").click()
    return at.run()


def test_the_data_page_reads_only_under_the_root(root, ckpts, monkeypatch):
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    monkeypatch.setenv("DORA_DASHBOARD_ROOT", str(root))
    at = run_data_page(monkeypatch, "base.safetensors", str(ckpts["tuned"]))  # tuned: outside
    assert not at.exception
    assert at.error[0].value == (f"{ckpts['tuned']}: no such file or folder under the data root")
    assert "table" not in at.session_state
    assert f"under the data root {os.path.realpath(root)}" in at.info[0].value
    at = run_data_page(monkeypatch, "base.safetensors", "run/inner.safetensors")
    assert not at.exception and not at.error
    assert set(at.session_state["table"]["module"]) == {"q"}


def test_a_served_dashboard_without_a_root_reads_no_typed_path(ckpts, monkeypatch):
    from streamlit import config

    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    monkeypatch.delenv("DORA_DASHBOARD_ROOT", raising=False)
    previous = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")  # as `dora-dashboard --host 0.0.0.0` does
    try:
        at = run_data_page(monkeypatch, str(ckpts["base"]), str(ckpts["tuned"]))
    finally:
        config.set_option("server.address", previous)
    assert not at.exception and "typed paths are off" in at.info[0].value
    assert "no data root is named, so typed paths are not read" in at.error[0].value
    assert "table" not in at.session_state
