"""The results cache through ``analyze(cache=...)``: a second run computes nothing and gives the
same table bit for bit; a changed file or setting is never served from the cache; a folder that
cannot hold a cache means a run without one, with a note."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis import executors
from dora_analysis.cache.results import decode, encode
from dora_analysis.cache.store import FILE_NAME
from tests.common import WIDE_BLOCK, llama_state, perturb, wide_state

SPY = []


@pytest.fixture
def computed(monkeypatch):
    """The number of units computed (not served by the cache) since the last call."""
    real = executors.compute_unit
    count = []
    monkeypatch.setattr(executors, "compute_unit",
                        lambda *a, **k: count.append(1) or real(*a, **k))

    def take() -> int:
        n = len(count)
        count.clear()
        return n
    return take


@pytest.fixture
def pair(tmp_path):
    base = llama_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(perturb(base, 0.02, seed=1), str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a.to_csv().encode() == b.to_csv().encode()


def test_a_second_run_computes_nothing_and_gives_the_same_table(pair, tmp_path, computed,
                                                                 caplog):
    cache = tmp_path / "cache"
    first = da.analyze(*pair, cache=cache, spectrum=True, axis="both")
    n = computed()
    assert n == 23 and (cache / FILE_NAME).is_file()
    with caplog.at_level(logging.INFO, logger="dora_analysis"):
        second = da.analyze(*pair, cache=cache, spectrum=True, axis="both")
    assert computed() == 0
    same(first, second)
    assert "23 of 23 matrix pairs read from it, 0 computed" in caplog.text
    same(first, da.analyze(*pair, spectrum=True, axis="both"))  # and an uncached run's
    computed()
    # labels, methods and the selection are not in the key: their rows come from the cache too
    relabelled = da.analyze(*pair, cache=cache, spectrum=True, axis="both", labels=["x"],
                            methods=["ft"], modules="q,v")
    assert computed() == 0 and set(relabelled["checkpoint"]) == {"x"}
    same(relabelled, da.analyze(*pair, spectrum=True, axis="both", labels=["x"],
                                methods=["ft"], modules="q,v"))


def test_pieces_of_large_pairs_and_threads_give_the_serial_table(tmp_path, computed):
    save_file(wide_state(0), str(tmp_path / "b.safetensors"))
    save_file(perturb(wide_state(0), 0.1, seed=3), str(tmp_path / "t.safetensors"))
    args = (tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    serial = da.analyze(*args, block_elements=WIDE_BLOCK, workers=1, axis="both")
    computed()
    cached = da.analyze(*args, block_elements=WIDE_BLOCK, workers=3, axis="both",
                        cache=tmp_path / "c")
    assert computed() > 3  # pieces
    same(cached, serial)
    same(da.analyze(*args, block_elements=WIDE_BLOCK, workers=2, axis="both",
                    cache=tmp_path / "c"), serial)
    assert computed() == 0


def rewrite_same_size_keeping_mtime(path, state) -> None:
    st_ = os.stat(path)
    tmp = path.with_suffix(".new")
    save_file(state, str(tmp))
    assert tmp.stat().st_size == st_.st_size
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(tmp.read_bytes())
    tmp.unlink()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))


@pytest.mark.parametrize("change", ["same-size-rewrite-mtime-kept", "touch", "rename-replace",
                                    "same-stamps"])
def test_a_changed_file_is_never_served_from_the_cache(pair, tmp_path, change, monkeypatch):
    base, tuned = pair
    cache = tmp_path / "cache"
    old = da.analyze(base, tuned, cache=cache)
    other = perturb(llama_state(0), 0.05, seed=9)
    if change == "same-size-rewrite-mtime-kept":
        rewrite_same_size_keeping_mtime(tuned, other)
    elif change == "touch":
        tuned.touch()
    elif change == "rename-replace":
        st_ = os.stat(tuned)
        save_file(other, str(tmp_path / "swap"))
        os.utime(tmp_path / "swap", ns=(st_.st_atime_ns, st_.st_mtime_ns))
        os.replace(tmp_path / "swap", tuned)
    else:  # a rewrite within one clock tick: stat sees nothing, the content digest does
        from dora_analysis.cache import identity

        stamps = {str(p): identity.file_stamp(p) for p in (base, tuned)}
        monkeypatch.setattr(identity, "file_stamp", lambda p: stamps.get(str(p)))
        rewrite_same_size_keeping_mtime(tuned, other)
    new = da.analyze(base, tuned, cache=cache)
    same(new, da.analyze(base, tuned))
    if change != "touch":
        assert not new["delta_d"].equals(old["delta_d"])


@pytest.mark.parametrize("settings", [{"axis": "in"}, {"spectrum": True},
                                      {"block_elements": 1 << 14}, {"intruder_k": 3,
                                                                   "intruders": True},
                                      {"io": "pread"}])
def test_every_setting_that_changes_a_number_is_in_the_key(pair, tmp_path, settings, computed):
    da.analyze(*pair, cache=tmp_path / "c", intruders="intruders" in settings)
    computed()
    table = da.analyze(*pair, cache=tmp_path / "c", **settings)
    assert computed() == 23  # nothing served from the other settings' entries
    same(table, da.analyze(*pair, **settings))


def test_an_adapter_series_and_its_base_config(tmp_path, computed):
    from tests import peft_models as pm

    case = pm.make_case(tmp_path, "dora", *pm.CASES["dora"])
    first = da.analyze(case.base, case.adapter, cache=tmp_path / "c")
    n = computed()
    same(da.analyze(case.base, case.adapter, cache=tmp_path / "c"), first)
    assert computed() == 0
    config = case.adapter / "adapter_config.json"
    fields = json.loads(config.read_text())
    config.write_text(json.dumps(fields | {"lora_alpha": fields["lora_alpha"] + 1}))
    changed = da.analyze(case.base, case.adapter, cache=tmp_path / "c")
    assert computed() == n
    same(changed, da.analyze(case.base, case.adapter))
    computed()
    materialized = da.analyze(case.base, case.adapter, cache=tmp_path / "c", closed_form=False)
    assert computed() == n  # closed form or not: other entries
    same(materialized, da.analyze(case.base, case.adapter, closed_form=False))


def test_a_folder_that_cannot_hold_a_cache_means_a_run_without_it(pair, tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    expected = da.analyze(*pair)
    with caplog.at_level(logging.INFO, logger="dora_analysis"):
        same(da.analyze(*pair, cache=tmp_path / "file" / "cache"), expected)
    assert "cannot be used" in caplog.text and "running without it" in caplog.text
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / FILE_NAME).write_bytes(os.urandom(8192))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dora_analysis"):
        same(da.analyze(*pair, cache=tmp_path / "junk"), expected)
    assert "results cache" in caplog.text and "without it" in caplog.text


def test_the_library_writes_no_cache_unless_asked(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    da.analyze(*pair)
    assert not (tmp_path / "xdg").exists()
    da.analyze(*pair, cache=True)
    assert (tmp_path / "xdg" / "dora-analysis" / FILE_NAME).is_file()


def test_an_entry_from_another_version_is_computed_again(pair, tmp_path, computed):
    import sqlite3

    first = da.analyze(*pair, cache=tmp_path / "c")
    computed()
    db = sqlite3.connect(tmp_path / "c" / FILE_NAME)
    db.execute("UPDATE entries SET value = x'7b7d20'")  # '{} ': decodes to nothing usable
    db.commit()
    db.close()
    same(da.analyze(*pair, cache=tmp_path / "c"), first)
    assert computed() == 23


VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(),
                   st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True))


@given(st.dictionaries(st.sampled_from(["out", "in"]),
                       st.dictionaries(st.text(min_size=1), VALUES, max_size=8), max_size=2))
def test_values_round_trip_bit_for_bit(values):
    back = decode(encode(values))
    assert list(back) == list(values)
    for axis, row in values.items():
        assert list(back[axis]) == list(row)
        for col, v in row.items():
            w = back[axis][col]
            assert type(w) is type(v)
            if isinstance(v, float):
                assert torch.tensor(v, dtype=torch.float64).view(torch.int64) == \
                    torch.tensor(w, dtype=torch.float64).view(torch.int64)
            else:
                assert w == v


def test_a_nan_keeps_its_sign_and_payload():
    import struct

    nan = struct.unpack("<d", bytes.fromhex("0100000000f8ffff"))[0]  # a negative, quiet NaN
    back = decode(encode({"out": {"x": nan}}))["out"]["x"]
    assert struct.pack("<d", back) == struct.pack("<d", nan)


def test_copies_of_a_checkpoint_elsewhere_are_other_entries(pair, tmp_path, computed):
    da.analyze(*pair, cache=tmp_path / "c")
    computed()
    shutil.copytree(pair[0].parent, tmp_path / "copy", ignore=shutil.ignore_patterns("c"))
    da.analyze(tmp_path / "copy" / "base.safetensors", tmp_path / "copy" / "tuned.safetensors",
               cache=tmp_path / "c")
    assert computed() == 23


def test_remote_readers_are_told_only_the_missing_pairs(pair, tmp_path, monkeypatch):
    from dora_analysis.io.safetensors import SafetensorsFile

    da.analyze(*pair, cache=tmp_path / "c", modules="q,v")
    told = []  # the one safetensors reader, local or remote, hands the hint to its bytes
    monkeypatch.setattr(SafetensorsFile, "will_read", lambda self, names: told.append(list(names)))
    da.analyze(*pair, cache=tmp_path / "c")  # q and v are known: not fetched again
    names = {n for names in told for n in names}
    assert names and not any(".q_proj." in n or ".v_proj." in n for n in names)
