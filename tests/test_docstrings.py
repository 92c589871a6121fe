"""The examples in the package's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dora_analysis

#: The dashboard's page scripts run under Streamlit only; importing one would draw its page.
SCRIPTS = ("dora_analysis.app.streamlit_app", "dora_analysis.app.views.")
MODULES = sorted(m.name for m in pkgutil.walk_packages(dora_analysis.__path__, "dora_analysis.")
                 if not m.name.startswith(SCRIPTS))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (above)"
