"""Tables read back exactly as written, in every format: dtypes and values, every column of the
registry, hostile labels (``NA``, ``NaN``, ``None``, ``null`` …), floats to the last bit."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dora_analysis as da
from dora_analysis import columns as C
from dora_analysis import metrics
from dora_analysis.errors import TableFormatError
from dora_analysis.tables import table_dtypes

FORMATS = (".csv", ".json", ".parquet")
#: Labels that CSV and JSON readers like to turn into missing values, numbers or booleans.
HOSTILE = ["NA", "NaN", "nan", "None", "null", "NULL", "N/A", "#N/A", "n/a", "-NaN", "<NA>",
           "", " ", "1", "1.0", "-0", "1e5", "0x1A", "True", "false", "inf", "-Infinity",
           "Infinity", "a,b", 'say "hi"', "two\nlines", "cr\rlf", "\ufeffbom", "tab\tstop",
           "é € 😀", "#comment", "'quoted'", "[1, 2]", '{"a": 1}']
#: Any text a label can be (a NUL cannot reach a label: not in paths nor in arguments; nor can
#: a lone surrogate: names that are not UTF-8 are escaped, see io.guard.shown).
text = st.one_of(st.sampled_from(HOSTILE), st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12))
VALUES = {
    "str": text,
    "string": text,
    "int64": st.integers(-(2**63), 2**63 - 1),
    "Int64": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "float64": st.floats(allow_nan=True, allow_infinity=True),
}


@st.composite
def tables(draw, missing_text: bool) -> pd.DataFrame:
    """A table with every column a table can have (contract and metric registry)."""
    rows = draw(st.integers(1, 5))
    columns = {}
    for column, dtype in table_dtypes().items():
        values = st.one_of(st.none(), VALUES[dtype]) if missing_text and dtype in (
            "str", "string") else VALUES[dtype]
        columns[column] = pd.Series(draw(st.lists(values, min_size=rows, max_size=rows)),
                                    dtype=object).astype(dtype)
    return pd.DataFrame(columns)


def round_trip(table: pd.DataFrame, suffix: str, folder) -> pd.DataFrame:
    path = folder / f"t{suffix}"
    da.write_table(table, path)
    return da.read_table(path)


ROUND_TRIP = settings(max_examples=60, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("suffix", FORMATS)
@ROUND_TRIP
@given(data=st.data())
def test_every_table_reads_back_exactly(tmp_path, suffix, data):
    # CSV cannot tell a missing text from an empty one (both are an empty field); the tables
    # the product writes hold no missing text
    table = data.draw(tables(missing_text=suffix != ".csv"))
    back = round_trip(table, suffix, tmp_path)
    assert list(back.dtypes.astype(str)) == list(table.dtypes.astype(str))
    pd.testing.assert_frame_equal(back, table, check_exact=True)


def test_the_registry_covers_the_analysis_table(ckpts):
    """Every column an analysis writes is in the schema with the dtype it is written with."""
    options = {m.option: True for m in metrics.METRICS if m.option}
    table = da.analyze(ckpts["base"], ckpts["tuned"], labels=["NA"], **options)
    assert {c: str(t) for c, t in table.dtypes.items()} == {
        c: t for c, t in table_dtypes().items() if c in table}
    assert set(table.columns) == set(table_dtypes())
    for suffix in FORMATS:
        pd.testing.assert_frame_equal(round_trip(table, suffix, ckpts["root"].parent),
                                      table, check_exact=True)


@pytest.mark.parametrize("suffix", FORMATS)
def test_labels_that_look_like_missing_values(tmp_path, suffix):
    """The issue's case: checkpoints labelled NA, NaN, None, null stay labels."""
    table = pd.DataFrame({C.CHECKPOINT: ["NA", "NaN", "None", "null"], C.MODULE: ["q"] * 4,
                          C.DELTA_M: [0.1, 0.2, 0.3, 0.4], C.DELTA_D: [1e-3] * 4,
                          C.STEP: pd.array([None, 1, 2, None], dtype="Int64")}).astype(
        {C.CHECKPOINT: "str", C.MODULE: "str"})
    back = round_trip(table, suffix, tmp_path)
    assert back[C.CHECKPOINT].tolist() == ["NA", "NaN", "None", "null"]
    pd.testing.assert_frame_equal(back, table, check_exact=True)


def test_json_keeps_the_last_bit_and_integer_columns(tmp_path):
    floats = [0.1 + 0.2, 2.2250738585072014e-308, 5e-324, 1.7976931348623157e308, -math.inf,
              math.inf, 1 / 3, 123456789.12345679]
    n = len(floats)
    table = pd.DataFrame({C.CHECKPOINT: ["a"] * n, C.MODULE: ["q"] * n, C.DELTA_M: floats,
                          C.DELTA_D: floats[::-1],
                          C.EXPERT: pd.array([None, 3] * (n // 2), dtype="Int64"),
                          "energy_rank_90": pd.array([1, None] * (n // 2), dtype="Int64"),
                          "intruders": pd.array([0] * n, dtype="Int64")}).astype(
        {C.CHECKPOINT: "str", C.MODULE: "str"})
    back = round_trip(table, ".json", tmp_path)
    assert back[C.DELTA_M].tolist() == floats  # bit for bit
    for column in (C.EXPERT, "energy_rank_90", "intruders"):
        assert str(back[column].dtype) == "Int64"
    pd.testing.assert_frame_equal(back, table, check_exact=True)


@pytest.mark.parametrize("suffix, content, match", [
    (".csv", "checkpoint,module,delta_m,delta_d,step\na,q,0.1,0.2,1.5\n",
     "column 'step' holds values that are not whole numbers"),
    (".csv", "checkpoint,module,delta_m,delta_d\na,q,fast,0.2\n",
     "column 'delta_m' holds values that are not of type float64"),
    (".json", '{"checkpoint": "a"}', "not a list of records"),
    (".json", '[{"checkpoint": "a", "module": "q", "delta_m": 0.1, "delta_d": 0.2, "layer": true}]',
     "column 'layer' holds values that are not whole numbers"),
])
def test_malformed_tables_are_named(tmp_path, suffix, content, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(TableFormatError, match=f"bad{suffix}: .*{match}"):
        da.read_table(path)
