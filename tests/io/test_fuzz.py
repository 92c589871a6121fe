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


def with_bytes_changed(good: bytes, max_edits: int) -> st.SearchStrategy[bytes]:
    """``good`` with 1 to ``max_edits`` of its bytes set to other values."""
    def apply(edits: list[tuple[int, int]]) -> bytes:
        data = bytearray(good)
        for pos, value in edits:
            data[pos] = value
        return bytes(data)

    return st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)),
                    min_size=1, max_size=max_edits).map(apply)


@FUZZ
@given(data=with_bytes_changed(GOOD, 6))
def test_byte_mutations(tmp_path_factory, data):
    check(data, tmp_path_factory)


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


# --- adapter configs and shard indexes: mutated keys, types and nesting ----------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    | st.just(DEEP := "__deeply_nested__"),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def locations(doc):
    """Every (container, key) in a JSON document, outermost first."""
    items = (doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list)
             else ())
    for key, value in list(items):
        yield doc, key
        yield from locations(value)


def mutate(doc, data, keys=()):
    """One random edit: replace a value, delete or rename a key, or wrap a value (or the whole
    document) in more nesting; ``keys`` are top-level keys the reader uses, edited more often."""
    where = list(locations(doc))
    op = data.draw(st.sampled_from(["replace", "delete", "rename", "wrap", "add", "wrap-all"]))
    if op == "wrap-all" or not where:
        return data.draw(st.sampled_from([[doc], {"config": doc}, DEEP]))
    if keys and isinstance(doc, dict) and data.draw(st.booleans()):
        where = [(doc, data.draw(st.sampled_from(keys)))]
        doc.setdefault(where[0][1], None)
    container, key = data.draw(st.sampled_from(where))
    if op == "replace":
        container[key] = data.draw(json_values)
    elif op == "delete":
        del container[key]
    elif op == "rename" and isinstance(container, dict):
        container[data.draw(st.text(max_size=8))] = container.pop(key)
    elif op == "wrap":
        container[key] = data.draw(st.sampled_from([[container[key]], {"x": container[key]}]))
    elif isinstance(container, dict):
        container[data.draw(st.text(max_size=8))] = data.draw(json_values)
    return doc


def dump(doc) -> str:
    text = json.dumps(doc)  # floats: NaN and Infinity too, as Python writes (and reads) them
    return text.replace(json.dumps(DEEP), "[" * 50_000 + "]" * 50_000)


def mutated(original: dict, data, keys=()) -> str:
    doc = json.loads(json.dumps(original))
    for _ in range(data.draw(st.integers(1, 3))):
        doc = mutate(doc, data, keys)
    return dump(doc)


#: adapter_config.json keys the readers act on (PEFT writes some 40).
ADAPTER_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                "peft_type", "fan_in_fan_out", "init_lora_weights", "base_model_name_or_path",
                "target_modules", "modules_to_save")


@pytest.fixture
def one_thread():
    # Tiny matrices: torch's thread pool costs more than it gives (20x on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def analyse_only_own_errors(base, tuned):
    """The loader either analyses or raises the project's own error; never anything else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            da.analyze(base, tuned)
        except DoraAnalysisError:
            pass


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    peft_models = pytest.importorskip("tests.peft_models")
    root = tmp_path_factory.mktemp("fuzz_adapter")
    fn, kwargs = peft_models.CASES["patterns"]  # rank_pattern, alpha_pattern, DoRA
    return peft_models.make_case(root, "patterns", fn, kwargs)


JSON_FUZZ = settings(max_examples=80, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])


@JSON_FUZZ
@given(data=st.data())
def test_adapter_config_mutations(peft_adapter, tmp_path_factory, one_thread, data):
    config_path = peft_adapter.adapter / "adapter_config.json"
    original = json.loads(config_path.read_text())
    folder = tmp_path_factory.mktemp("adapter")
    for f in peft_adapter.adapter.iterdir():
        (folder / f.name).symlink_to(f)
    text = mutated(original, data, ADAPTER_KEYS)
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").write_text(text)
    analyse_only_own_errors(peft_adapter.base, folder)
    assert (folder / "adapter_config.json").read_text() == text  # input untouched


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from tests.common import llama_state, write_sharded

    root = tmp_path_factory.mktemp("fuzz_index")
    state = llama_state(0)
    from safetensors.torch import save_file

    save_file(state, str(root / "base.safetensors"))
    index = write_sharded(state, root / "tuned")
    return root / "base.safetensors", index


@JSON_FUZZ
@given(data=st.data())
def test_index_mutations(sharded, tmp_path_factory, one_thread, data):
    base, index = sharded
    original = json.loads(index.read_text())
    folder = tmp_path_factory.mktemp("index")
    for f in index.parent.iterdir():
        if f.suffix == ".safetensors":
            (folder / f.name).symlink_to(f)
    text = mutated(original, data)
    (folder / index.name).write_text(text)
    analyse_only_own_errors(base, folder)
    assert (folder / index.name).read_text() == text
