"""One safetensors header validator for local and remote files, as strict as the safetensors
library: on the same bytes, ``safe_open``, the local reader and the remote reader give the same
verdict (and, when accepted, the same tensors)."""

from __future__ import annotations

import itertools
import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from dora_analysis.errors import CheckpointFormatError
from dora_analysis.io.dtypes import DTYPES
from dora_analysis.io.remote import RemoteSafetensors, Url
from dora_analysis.io.safetensors import SafetensorsFile
from dora_analysis.io.safetensors_header import DTYPE_BITS, parse_header
from tests.io.test_fuzz import with_bytes_changed
from tests.servers import FileServer

_names = itertools.count()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("headers")
    with FileServer(folder) as server:
        yield folder, server


def library(path) -> dict | None:
    """What safetensors itself reads: name → (shape, dtype), or None when it refuses."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()}
    except Exception:  # the Rust reader raises SafetensorError and others
        return None


NAMES = {d.name: d.safetensors for d in DTYPES.values()}


def ours(source) -> dict:
    infos = {k: source.info(k) for k in source.keys()}
    return {k: (list(i.shape), NAMES.get(i.dtype, i.dtype)) for k, i in infos.items()}


def verdicts(blob: bytes, served) -> tuple:
    """``(library, local, remote)``: what each makes of ``blob`` (None: refused)."""
    folder, server = served
    name = f"h{next(_names)}.safetensors"
    (folder / name).write_bytes(blob)
    results = []
    for open_ in (lambda: SafetensorsFile(folder / name, "pread"),
                  lambda: RemoteSafetensors(Url(f"{server.url}/{name}"))):
        try:
            with open_() as src:
                results.append(ours(src))
        except CheckpointFormatError:
            results.append(None)
    return library(folder / name), *results


def assert_same(blob: bytes, served) -> None:
    expected, local, remote = verdicts(blob, served)
    assert local == expected, (blob[:300], expected, local)
    assert remote == expected, (blob[:300], expected, remote)


# -- generated headers: JSON text built piece by piece, so that it can be anything -----------------

number = st.one_of(st.integers(0, 5).map(str), st.sampled_from(
    ["-0", "-1", "true", "null", "1.0", "1e0", "2e400", "18446744073709551615",
     "18446744073709551616", "4294967296", "1" + "0" * 320, "NaN", '"1"']))
#: Mostly what a real file holds, sometimes not: about half of the files come out valid.
#: (Hypothesis draws bounds such as 0 far more often than 1/n: choices are drawn by index.)
def rarely(common: st.SearchStrategy, odd: st.SearchStrategy, one_in: int = 8) -> st.SearchStrategy:
    return chance(one_in).flatmap(lambda odd_one: odd if odd_one else common)


def chance(one_in: int) -> st.SearchStrategy[bool]:
    return st.sampled_from(range(one_in)).map(lambda i: i == one_in - 1)


dtype = rarely(
    st.sampled_from(["F32", "BF16", "F16", "U8", "I64", "BOOL", "F4", "F6_E2M3", "U16", "C64"]
                    ).map(json.dumps),
    st.sampled_from(['"f32"', '"Q9"', '{"F32":null}', '{"F32":[]}', "true", '{"F32":null,"x":1}',
                     '["F32"]']))
nested = st.one_of(
    st.integers(1, 3), st.sampled_from([124, 125, 126, 200])
).map(lambda d: "[" * d + "]" * d)
extra_value = st.one_of(
    nested, number, st.just('"ok"'), st.just("[1, {}]"),
    st.sampled_from(['"\\ud800"', '"\\ud83d\\ude00"', '"\\\\ud800"', '"a\\u0000b"', '{"a":1,"a":2}',
                     '"\x01"', '{"__metadata__":{"a":1}}', "[1,]", "-999999999999999999999999"]))


@st.composite
def tensor(draw, at: int) -> tuple[str, int]:
    """One tensor's JSON and where the next one starts (its byte range follows ``at``)."""
    dt = draw(dtype)
    plain = not draw(chance(6))
    dims = draw(st.lists(st.integers(0, 5), max_size=3)) if plain else None
    shape = ("[" + ",".join(map(str, dims)) + "]" if plain
             else draw(st.one_of(st.lists(number, max_size=3).map(lambda d: f"[{','.join(d)}]"),
                                 st.sampled_from(["[]", "{}", "3", "[[1]]"]))))
    bits = DTYPE_BITS.get(json.loads(dt) if dt.startswith('"') else "F32", 32)
    size = math.prod(dims) * bits // 8 if plain else draw(st.integers(0, 8))
    begin, end = at, at + size
    if draw(chance(13)):  # a wrong range
        begin, end = draw(st.sampled_from([(begin + 1, end + 1), (end, begin), (0, 0),
                                           (begin, end + 1), (begin, end - 1)]))
    offsets = draw(rarely(st.just(f"[{begin},{end}]"),
                          st.sampled_from([f"[{begin}]", f"[{begin},{end},0]", f"[{begin},{end}.0]",
                                           "{}"]), 12))
    fields = [f'"dtype":{dt}', f'"shape":{shape}', f'"data_offsets":{offsets}']
    if draw(chance(7)):
        return f"[{dt},{shape},{offsets}]", end  # serde reads a struct from an array too
    if draw(chance(7)):
        fields.append(f'"x":{draw(extra_value)}')
    if draw(chance(13)):
        fields.append(draw(st.sampled_from(fields)))  # a duplicate field
    fields = draw(st.permutations(fields))
    if draw(chance(13)):
        fields.pop()  # a missing field
    return "{" + ",".join(fields) + "}", end


@st.composite
def header_file(draw) -> bytes:
    members, at = [], 0
    for i in range(draw(st.integers(0, 4))):
        name = draw(rarely(st.sampled_from([f"w{i}", f"a.{i}.weight", f"\\u00e9{i}", ""]),
                           st.sampled_from(["w0", "\\ud800", "x\\ty", "x\ty"]), 12))
        value, at = draw(tensor(at))
        members.append(f'"{name}":{value}')
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 1, 1, 1, 2]))):
        members.insert(draw(st.integers(0, len(members))), '"__metadata__":' + draw(rarely(
            st.sampled_from(["null", '{"a":"b"}', '{"a":"b","a":"c"}', "{}"]),
            st.sampled_from(['{"a":1}', "[]", '{"a":null}']), 4)))
    text = (draw(rarely(st.sampled_from(["", " ", "\n"]), st.just("\ufeff"), 12))
            + "{" + ",".join(members) + "}"
            + draw(rarely(st.sampled_from(["", "   "]), st.sampled_from(["\x00", "x", ","]), 12)))
    raw = text.encode("utf-8", "surrogatepass")
    data = b"\0" * max(0, at + draw(rarely(st.just(0), st.sampled_from([1, -1]), 12)))
    return struct.pack("<Q", len(raw)) + raw + data


SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(blob=header_file())
def test_generated_headers_get_the_librarys_verdict(served, blob):
    assert_same(blob, served)


GOOD = save({"model.layers.0.q_proj.weight": torch.randn(6, 4),
             "model.layers.0.up_proj.weight": torch.randn(3, 5).bfloat16(),
             "norm.weight": torch.ones(4)}, metadata={"format": "pt"})


@SETTINGS
@given(blob=with_bytes_changed(GOOD, 4))
def test_mutated_files_get_the_librarys_verdict(served, blob):
    assert_same(blob, served)


@pytest.mark.parametrize("text, data, accepted", [
    ('\ufeff{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4, False),  # UTF-8 BOM
    ('{"__metadata__":{"a":1},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4, False),
    ('{"w":{"dtype":"F32","shape":[true,1],"data_offsets":[0,4]}}', 4, False),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":NaN}}', 4, False),
    ('{"w":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', 0, False),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":"\\udc00"}}', 4, False),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 125 + "]" * 125 + "}}",
     4, True),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 126 + "]" * 126 + "}}",
     4, False),
    ('{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2, False),  # ends mid-byte
    ('{"w":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0, False),
    ('{"w":["F32",[1],[0,4]]}', 4, True),
    ('{"w":{"dtype":{"F32":null},"shape":[1],"data_offsets":[0,4],"unknown":[1,2]}}', 4, True),
    ('{"w":{"dtype":"U16","shape":[2],"data_offsets":[0,4]}}', 4, True),
])
def test_what_the_library_refuses_and_accepts(served, text, data, accepted):
    raw = text.encode("utf-8")
    blob = struct.pack("<Q", len(raw)) + raw + b"\0" * data
    expected, local, remote = verdicts(blob, served)
    assert (expected is not None) == accepted  # the library's verdict, pinned
    assert local == remote == expected


def test_a_refusal_names_the_file_and_the_reason(tmp_path, served):
    raw = b'{"w":{"dtype":"F32","shape":[true,4096],"data_offsets":[0,4]}}'
    with pytest.raises(CheckpointFormatError, match=r"m.safetensors: not a readable safetensors "
                                                    r"file \(tensor 'w' has an invalid shape"):
        parse_header(raw, 4, tmp_path / "m.safetensors")


# -- memory: a header near the 100 MB cap -------------------------------------------------------

PEAK = """
import resource, sys
import dora_analysis.io.safetensors as st
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with st.SafetensorsFile(sys.argv[1], "pread") as f:
    n = len(f.keys())
print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) * 1024)
"""


def many_tensors_header(path, header_bytes: int) -> int:
    """A valid file whose header is ``header_bytes`` long: hundreds of thousands of empty
    tensors (the most entries per header byte), as a hostile or generated file may hold."""
    entry = '"model.layers.{0}.mlp.experts.{1}.down_proj.weight":' \
            '{{"dtype":"BF16","shape":[0,4096],"data_offsets":[0,0]}}'
    parts, size, i = [], 2, 0
    while size < header_bytes:
        parts.append(entry.format(i, i % 97))
        size += len(parts[-1]) + 1
        i += 1
    raw = ("{" + ",".join(parts) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return len(raw)


@pytest.mark.slow
def test_a_large_header_is_read_in_a_few_times_its_size(tmp_path):
    """40 MiB of header (360 000 tensors): the reader's peak is bounded by a few times the
    header's size (it was ~11.7×: safetensors' own parse and a json.loads of dicts, both kept)."""
    import subprocess
    import sys

    n = many_tensors_header(tmp_path / "big.safetensors", 40 << 20)
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big.safetensors")],
                         capture_output=True, text=True, check=True).stdout.split()
    tensors, peak = int(out[0]), int(out[1])
    assert tensors > 300_000
    assert peak < 6 * n, f"{peak / 2**20:.0f} MiB for a {n / 2**20:.0f} MiB header"
