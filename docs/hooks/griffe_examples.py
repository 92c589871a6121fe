"""A griffe extension for the API pages: the project's docstrings are written for ``help()`` and
Sphinx-style readers; two of their habits are translated for mkdocstrings' Google-style parser.

* Doctests are titled ``Example:``, which Google style reads as an admonition (its ``>>>`` lines
  would render as quotes); read as ``Examples:``, they render as code.
* Cross-references are Sphinx roles (``:func:`analyze```, ``:data:`~x.METRICS```), which Markdown
  would print as they are; they become code spans (the name after any ``~``'s last dot).
"""

from __future__ import annotations

import re

import griffe

EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj|const|file):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            text = EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = ROLE.sub(_role, text)
