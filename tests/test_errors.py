"""The error classes: built-in types too, and intact after pickling (Dask sends them back)."""

from __future__ import annotations

import inspect
import pickle

import pytest

from dora_analysis import errors

CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass)
           if issubclass(c, errors.DoraAnalysisError)]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_survives_pickling(cls):
    exc = cls("tuned.safetensors: cannot read tensor 'w'")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and str(back) == str(exc)
    assert isinstance(back, errors.DoraAnalysisError)


def test_problem_lists_survive_pickling():
    exc = errors.TensorMismatchError("2 tensor(s) differ", ["a: [1] vs [2]", "b: [3] vs [4]"])
    back = pickle.loads(pickle.dumps(exc))
    assert back.problems == exc.problems and str(back) == str(exc)


@pytest.mark.parametrize("cls", [c for c in CLASSES if c is not errors.DoraAnalysisError],
                         ids=lambda c: c.__name__)
def test_every_error_is_also_a_built_in_type(cls):
    plain = (Exception, BaseException, object)
    assert any(b.__module__ == "builtins" and b not in plain for b in cls.__mro__)
