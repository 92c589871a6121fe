"""Remote checkpoints read in place: a loopback HTTP server with Range support, moto's S3 server,
and a fake Hub endpoint for ``hf://``. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis.cli import main
from dora_analysis.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigError,
    SkippedFoldersWarning,
)
from dora_analysis.io.open import ReadOptions, open_checkpoint, resolve
from dora_analysis.io.refs import CheckpointRef
from dora_analysis.io.remote import RemoteSafetensors, Url
from dora_analysis.io.safetensors import forget_headers
from tests.common import perturb, write_sharded
from tests.servers import FakeHub, FileServer

NUMBERS = [C.NAME, C.AXIS, C.DELTA_M, C.DELTA_D, C.MEAN_M0, C.N_VECTORS]


def big_state(seed: int) -> dict[str, torch.Tensor]:
    """Non-square weights large enough that headers are a small part of the bytes read."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (256, 192), "self_attn.k_proj": (64, 192),
              "self_attn.v_proj": (64, 192), "self_attn.o_proj": (192, 256),
              "mlp.gate_proj": (384, 192), "mlp.up_proj": (384, 192), "mlp.down_proj": (192, 384)}
    state = {}
    for layer in range(3):
        for module, shape in shapes.items():
            state[f"model.layers.{layer}.{module}.weight"] = torch.randn(*shape, generator=g)
        state[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(192)
    return state


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    base = big_state(0)
    save_file(base, str(root / "base.safetensors"))
    save_file(perturb(base, 0.02, seed=1), str(root / "tuned.safetensors"))
    write_sharded(perturb(base, 0.02, seed=1), root / "sharded", shards=3)
    (root / "folder").mkdir()
    shutil.copy(root / "tuned.safetensors", root / "folder" / "model.safetensors")
    return root


@pytest.fixture(scope="module")
def server(root):
    with FileServer(root) as srv:
        yield srv


def local_table(root, tuned="tuned.safetensors", **kw):
    return da.analyze(root / "base.safetensors", root / tuned, **kw)[NUMBERS]


def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_http_file_equals_local_and_reads_only_selected_tensors(root, server):
    server.reset()
    forget_headers()
    remote = da.analyze(f"{server.url}/base.safetensors", f"{server.url}/tuned.safetensors",
                        modules=("q", "v"))[NUMBERS]
    same(remote, local_table(root, modules=("q", "v")))
    base = big_state(0)
    selected = sum(base[n].numel() * 4 for n in base if n.endswith(("q_proj.weight",
                                                                    "v_proj.weight")))
    # both files: every selected tensor once, the headers, nothing else (<= 1.2x, measured)
    assert server.sent <= 1.2 * 2 * selected, (server.sent, selected)
    gets = [r for r in server.requests if r[0] == "GET"]
    headers = [r for r in gets if r[2].startswith("bytes=0-")]
    # one coalesced q/v request per layer and file; one header per file, although the plan and
    # the run each open both (the second open finds it by the file's ETag)
    assert len(gets) - len(headers) == 2 * 3 and len(headers) == 2


def test_a_small_selection_stays_within_the_byte_budget(root, server):
    server.reset()
    forget_headers()
    da.analyze(f"{server.url}/base.safetensors", f"{server.url}/tuned.safetensors",
               modules=("k",))
    base = big_state(0)
    selected = sum(base[n].numel() * 4 for n in base if n.endswith("k_proj.weight"))
    assert server.sent <= 1.2 * 2 * selected, (server.sent, selected)  # 1.22 before the cache


def test_a_changed_file_is_read_again_not_served_from_the_header_cache(tmp_path):
    save_file({"w": torch.ones(4, 3)}, tmp_path / "b.safetensors")
    save_file({"w": torch.ones(4, 3)}, tmp_path / "t.safetensors")
    with FileServer(tmp_path) as srv:
        url = f"{srv.url}/t.safetensors"
        assert da.analyze(tmp_path / "b.safetensors", url)["delta_m"].tolist() == [0.0]
        # same URL, new content and a different header layout (another name first)
        save_file({"a": torch.zeros(2), "w": 2 * torch.ones(4, 3)}, tmp_path / "t.safetensors")
        table = da.analyze(tmp_path / "b.safetensors", url)
        assert table["delta_m"].tolist() == pytest.approx([math.sqrt(3.0)])


def test_sharded_index_and_folders_remotely(root, server):
    expected = local_table(root)
    same(da.analyze(root / "base.safetensors",
                    f"{server.url}/sharded/model.safetensors.index.json")[NUMBERS], expected)
    same(da.analyze(root / "base.safetensors", f"{server.url}/sharded/")[NUMBERS], expected)
    same(da.analyze(root / "base.safetensors", f"{server.url}/folder")[NUMBERS], expected)


def test_get_rows_is_one_range_and_large_tensors_stream_in_windows(root, server):
    state = big_state(0)
    name = "model.layers.1.mlp.up_proj.weight"
    src = RemoteSafetensors(Url(f"{server.url}/base.safetensors"), max_request=100 * 192 * 4)
    with src:
        header, opened = src.bytes_read, src.requests  # none when an earlier open cached it
        assert torch.equal(src.get_rows(name, 10, 20), state[name][10:20])
        assert src.requests == opened + 1
        assert torch.equal(src.get_rows(name, 20, 110), state[name][20:110])  # in the window
        assert src.requests == opened + 1
        assert torch.equal(src.get_tensor(name), state[name])
        # windows of whole rows, at most max_request bytes each: memory stays bounded
        assert src.bytes_read - header <= 384 * 192 * 4 + 100 * 192 * 4


@pytest.mark.slow  # builds a PEFT model (imports transformers)
def test_peft_adapter_folder_remotely(tmp_path):
    from tests import peft_models as pm

    case = pm.make_case(tmp_path, "dora", *pm.CASES["dora"])
    with FileServer(tmp_path) as srv:
        remote = da.analyze(case.base, f"{srv.url}/dora/adapter/")
    local = da.analyze(case.base, case.adapter)
    same(remote[NUMBERS], local[NUMBERS])
    assert set(remote[C.METHOD]) == {"dora"}


@pytest.fixture
def s3(root, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket="ckpts")
    for name in ("base.safetensors", "tuned.safetensors"):
        client.upload_file(str(root / name), "ckpts", f"run/{name}")
    for file in (root / "sharded").iterdir():
        client.upload_file(str(file), "ckpts", f"sharded/{file.name}")
    yield "s3://ckpts"
    server.stop()


def test_s3_through_moto(root, s3):
    pytest.importorskip("s3fs")
    expected = local_table(root, modules=("q",))
    same(da.analyze(f"{s3}/run/base.safetensors", f"{s3}/run/tuned.safetensors",
                    modules=("q",))[NUMBERS], expected)
    same(da.analyze(root / "base.safetensors", f"{s3}/sharded/", modules=("q",))[NUMBERS],
         expected)
    with pytest.raises(CheckpointNotFoundError, match=r"s3://ckpts/run/nope.safetensors: not "
                                                      r"found \(HTTP 404\)"):
        open_checkpoint(resolve(CheckpointRef.parse(f"{s3}/run/nope.safetensors"))[0])


def test_a_remote_run_folder_is_a_series(root, s3, tmp_path):
    # checkpoint-N/ folders on S3 (a Trainer output_dir synced there) are the steps of one run,
    # as they are locally; checkpoint-abc is skipped with a warning, as it is locally
    pytest.importorskip("s3fs")
    import boto3

    run = tmp_path / "run"
    for step, seed in ((10, 1), (200, 2)):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        save_file(perturb(big_state(0), 0.01 * seed, seed=seed),
                  str(run / f"checkpoint-{step}" / "model.safetensors"))
    (run / "checkpoint-abc").mkdir()
    shutil.copy(root / "tuned.safetensors", run / "checkpoint-abc" / "model.safetensors")
    client = boto3.client("s3")
    for file in run.rglob("*.safetensors"):
        client.upload_file(str(file), "ckpts", f"runs/{file.relative_to(tmp_path)}")
    with pytest.warns(SkippedFoldersWarning, match="checkpoint-abc"):
        local = da.analyze(root / "base.safetensors", run, modules=("q",))
    with pytest.warns(SkippedFoldersWarning, match="checkpoint-abc"):
        remote = da.analyze(root / "base.safetensors", f"{s3}/runs/run", modules=("q",))
    same(remote[[C.CHECKPOINT, C.STEP, *NUMBERS]], local[[C.CHECKPOINT, C.STEP, *NUMBERS]])
    assert sorted(set(remote[C.STEP])) == [10, 200]
    assert set(remote[C.REF]) == {f"{s3}/runs/run/checkpoint-10", f"{s3}/runs/run/checkpoint-200"}

    client.upload_file(str(run / "checkpoint-10" / "model.safetensors"), "ckpts",
                       "runs/run/checkpoint-0010/model.safetensors")
    with pytest.raises(CheckpointFormatError, match="two checkpoints for step 10: "
                                                    "checkpoint-0010/ and checkpoint-10/"):
        da.analyze(root / "base.safetensors", f"{s3}/runs/run", modules=("q",))


@pytest.fixture
def fake_hub(root, monkeypatch):
    hub_root = root.parent / (root.name + "-hub")
    (hub_root / "org" / "model").mkdir(parents=True, exist_ok=True)
    (hub_root / "org" / "tuned" / "sub").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "base.safetensors", hub_root / "org" / "model" / "model.safetensors")
    shutil.copy(root / "tuned.safetensors", hub_root / "org" / "tuned" / "sub" / "t.safetensors")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with FakeHub(hub_root) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def test_hf_urls_through_a_fake_hub(root, fake_hub):
    expected = local_table(root, modules=("v",))
    table = da.analyze("hf://org/model", "hf://org/tuned@main/sub/t.safetensors",
                       modules=("v",))
    same(table[NUMBERS], expected)
    assert set(table[C.REF]) == {"hf://org/tuned@main/sub/t.safetensors"}
    resolves = [r for r in fake_hub.requests if "/resolve/" in r[1]]
    assert all(r[2] is not None for r in resolves)  # every file read is a ranged GET
    with pytest.raises(CheckpointNotFoundError, match="hf://org/missing/model.safetensors: "
                                                      "not found"):
        da.analyze("hf://org/missing/model.safetensors", root / "tuned.safetensors")


def test_a_hub_run_folder_is_a_series(root, fake_hub):
    # a Trainer run pushed with its checkpoint-N/ folders (hub_strategy="all_checkpoints")
    repo = fake_hub.root / "org" / "run"
    for step in (5, 50):
        (repo / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
        save_file(perturb(big_state(0), 0.01, seed=step),
                  str(repo / f"checkpoint-{step}" / "model.safetensors"))
    local = da.analyze(root / "base.safetensors", repo, modules=("v",))
    remote = da.analyze(root / "base.safetensors", "hf://org/run", modules=("v",))
    same(remote[[C.STEP, *NUMBERS]], local[[C.STEP, *NUMBERS]])
    assert set(remote[C.REF]) == {"hf://org/run/checkpoint-5", "hf://org/run/checkpoint-50"}


def test_hf_url_refused_offline(root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        da.analyze("hf://org/model", root / "tuned.safetensors")


# --- references and credentials --------------------------------------------------------------

def test_reference_parsing_and_labels():
    ref = CheckpointRef.parse("https://me:secret@host:8080/runs/a/model.safetensors?sig=xyz")
    assert (ref.kind, str(ref)) == ("remote", "https://host:8080/runs/a/model.safetensors")
    assert ref.url.endswith("?sig=xyz") and "secret" not in repr(ref)
    assert ref.default_label == "a"
    assert CheckpointRef.parse("s3://b/x/tuned-dora.safetensors").default_label == "tuned-dora"
    assert CheckpointRef.parse("hf://org/name@v1/").default_label == "name@v1"
    assert CheckpointRef.parse("gs://bucket/ckpt/").kind == "remote"


def test_errors_name_the_url_without_credentials(root, capsys):
    forced = {r"^/denied": 403, r"^/gone": 404}
    with FileServer(root, status=forced) as srv:
        host = srv.url.removeprefix("http://")
        for path, code in (("denied/base.safetensors", "403"), ("gone/x.safetensors", "404")):
            url = f"http://user:hunter2@{host}/{path}?token=hunter3"
            assert main([str(root / "base.safetensors"), url]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("error: ")
            assert f"http://{host}/{path}" in err and f"HTTP {code}" in err
            assert "hunter" not in err


def test_timeout_is_an_error_naming_the_url(root):
    with FileServer(root, delay=3) as srv:
        url = Url(f"{srv.url}/base.safetensors")
        with pytest.raises(CheckpointNotFoundError, match=r"base.safetensors: timed out after "
                                                          r"0.5 s"):
            open_checkpoint(url, ReadOptions(timeout=0.5))


def test_server_without_range_support_is_refused_without_full_download(tmp_path):
    # 64 MiB: far more than the loopback socket buffers hold, so a client that stopped reading
    # after the header cannot have had the whole file pushed at it
    save_file({"w": torch.zeros(4096, 4096)}, tmp_path / "big.safetensors")
    size = (tmp_path / "big.safetensors").stat().st_size
    with FileServer(tmp_path, ranges=False) as srv:
        with pytest.raises(CheckpointFormatError, match="does not support HTTP range requests"):
            da.analyze(f"{srv.url}/big.safetensors", tmp_path / "big.safetensors")
        assert srv.sent < size / 2  # the header came from byte 0; nothing was downloaded whole


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(ConfigError, match=r"pip install 'dora-analysis\[gcs\]'"):
        open_checkpoint(Url("gs://bucket/model.safetensors"))


def test_cli_prints_bytes_read(root, server, capsys):
    assert main([str(root / "base.safetensors"), f"{server.url}/tuned.safetensors",
                 "--modules", "q"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "request(s)" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: {server.url}/tuned.safetensors: read")


# --- header validation (as safetensors does) --------------------------------------------------

def _raw_file(path, header: dict, data: bytes, declared: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes((declared or len(raw)).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("header, data, declared, match", [
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, None,
     "data is 8 bytes but the header covers 16"),
    ({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "unknown dtype 'Q9'"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "8 bytes for shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None,
     r"has offsets \[4, 8\], expected a start at 0"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 1 << 40,
     "header of"),
    (["not", "an", "object"], b"", None, "not a JSON object"),
])
def test_corrupt_headers_are_refused(tmp_path, header, data, declared, match):
    _raw_file(tmp_path / "bad.safetensors", header, data, declared)
    with FileServer(tmp_path) as srv:
        with pytest.raises(CheckpointFormatError, match=match):
            RemoteSafetensors(Url(f"{srv.url}/bad.safetensors"))


# --- what cannot be reached or parsed: one error line each ------------------------------------

def _one_error_line(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_a_deeply_nested_header_over_http_is_one_error_line(root, tmp_path, capsys):
    """The same bytes locally and over HTTP: one error line each (it was a RecursionError)."""
    raw = ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 100_000
           + "]" * 100_000 + "}}").encode()
    (tmp_path / "deep.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    base = str(root / "base.safetensors")
    local = _one_error_line([base, str(tmp_path / "deep.safetensors")], capsys)
    with FileServer(tmp_path) as srv:
        remote = _one_error_line([base, f"{srv.url}/deep.safetensors"], capsys)
    for err in (local, remote):
        assert "deep.safetensors: not a readable safetensors file (header nested" in err


def _refused_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url, expected", [
    ("http://[::1:18081/m.safetensors", "http://[::1:18081/m.safetensors: not a valid URL "
                                        "(Invalid IPv6 URL); check the host and port"),
    ("http://user:pw@127.0.0.1:99999/m.safetensors?sig=x",
     "http://127.0.0.1:99999/m.safetensors: not a valid URL (Port out of range 0-65535)"),
    ("https://127.0.0.1:abc/m.safetensors", "https://127.0.0.1:abc/m.safetensors: not a valid URL"),
    ("s3:///key.safetensors", "s3:///key.safetensors: not a valid URL (no host or bucket"),
    ("http://127.0.0.1:PORT/m.safetensors",
     "http://127.0.0.1:PORT/m.safetensors: connection refused by 127.0.0.1:PORT; check the host "
     "and port, and that the server is running"),
    ("http://127.0.0.1:PORT/run/", "connection refused by 127.0.0.1:PORT"),  # a folder URL
])
def test_urls_that_cannot_be_reached(root, capsys, url, expected):
    port = str(_refused_port())
    url, expected = url.replace("PORT", port), expected.replace("PORT", port)
    err = _one_error_line([str(root / "base.safetensors"), url], capsys)
    assert expected in err and "404" not in err and "pw" not in err and "sig" not in err


@pytest.mark.parametrize("change", ["bom", "latin-1 name", "utf-16"])
def test_a_shard_index_gets_the_same_verdict_locally_and_remotely(root, tmp_path, change):
    """One JSON reader for both: the index's bytes are parsed alike wherever they lie."""
    folder = tmp_path / "sharded"
    shutil.copytree(root / "sharded", folder)
    index = folder / "model.safetensors.index.json"
    text = index.read_text()
    data = {"bom": b"\xef\xbb\xbf" + text.encode(),
            "latin-1 name": text.replace('"metadata"', '"m\xe9tadata"').encode("latin-1"),
            "utf-16": text.encode("utf-16")}[change]
    index.write_bytes(data)
    verdicts = []
    with FileServer(tmp_path) as srv:
        for ref in (index, Url(f"{srv.url}/sharded/model.safetensors.index.json")):
            try:
                with open_checkpoint(ref, ReadOptions()) as src:
                    verdicts.append(len(src.keys()))
            except CheckpointFormatError as exc:
                verdicts.append(str(exc).split(": ", 1)[1])
    assert verdicts[0] == verdicts[1]
