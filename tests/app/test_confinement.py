"""Every dashboard page reads paths only through the data-root check (SPEC §9).

Each page is tried with paths outside the root — absolute, climbing out with ``..``, a link
leading out, a folder holding such a link, and the ``ref`` of a row in a loaded table — and must
refuse them without the library reading anything. A new page must be added to :data:`DRIVERS`
(a test fails otherwise), and no page may call the library's readers itself: ``views/`` is
scanned for them.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import dora_analysis as da

testing = pytest.importorskip("streamlit.testing.v1")
APP = Path(da.__file__).parent / "app"
VIEWS = APP / "views"
#: The page scripts (``__init__.py`` only makes ``views`` a package that the wheel ships).
PAGES = sorted(p.name for p in VIEWS.glob("*.py") if p.name != "__init__.py")
REFUSED = "no such file or folder under the data root"


@pytest.fixture
def root(tmp_path, ckpts):
    """A data root holding a base and a run, beside links that lead out of it."""
    root = tmp_path / "data"
    (root / "run" / "checkpoint-10").mkdir(parents=True)
    (root / "base.safetensors").write_bytes(ckpts["base"].read_bytes())
    (root / "run" / "checkpoint-10" / "model.safetensors").write_bytes(
        (ckpts["series"] / "checkpoint-10" / "model.safetensors").read_bytes())
    (root / "escape.safetensors").symlink_to(ckpts["tuned"])
    (root / "outrun").symlink_to(ckpts["series"])
    (root / "leaky" / "checkpoint-10").mkdir(parents=True)
    (root / "leaky" / "checkpoint-10" / "model.safetensors").symlink_to(
        ckpts["series"] / "checkpoint-10" / "model.safetensors")
    return root


def outside(root: Path, ckpts) -> dict[str, tuple[str, str]]:
    """Ways to name something outside the root: (what is typed, the message's start)."""
    climb = os.path.relpath(ckpts["series"], root)
    return {
        "absolute": (str(ckpts["series"]), REFUSED),
        "dot-dot": (climb, REFUSED),
        "link out": ("outrun", REFUSED),
        "folder holding a link out": ("leaky", "holds a link that leads outside the data root"),
    }


@pytest.fixture
def reads(monkeypatch, root):
    """Every path the library was asked to read while a page ran (none may be outside)."""
    monkeypatch.setenv("DORA_DASHBOARD_ROOT", str(root))
    monkeypatch.delenv("DORA_DASHBOARD_TABLE", raising=False)
    monkeypatch.delenv("DORA_DASHBOARD_HUB", raising=False)
    import streamlit

    streamlit.cache_data.clear()
    seen: list[str] = []
    for name in ("analyze", "matrix_detail", "read_table", "compare_runs"):
        real = getattr(da, name)

        def spy(*args, _real=real, **kwargs):
            for arg in args[:2]:  # compare_runs takes a list of runs
                seen.extend(map(str, arg) if isinstance(arg, list) else [str(arg)])
            return _real(*args, **kwargs)

        monkeypatch.setattr(da, name, spy)
    return seen


def read_outside(seen: list[str], root: Path) -> list[str]:
    real = os.path.realpath(root)
    return [s for s in seen if not os.path.realpath(s).startswith(real + os.sep)]


def page(name: str, **state) -> testing.AppTest:
    at = testing.AppTest.from_file(str(VIEWS / name), default_timeout=90)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def submit(name: str, button: str, typed: dict[tuple[str, int], str]) -> testing.AppTest:
    """Page ``name`` with text typed into its widgets (kind, index), then ``button`` pressed."""
    at = page(name)
    for (kind, index), text in typed.items():
        getattr(at, kind)[index].input(text)
    next(b for b in at.button if b.label == button).click()
    return at.run()


def data_page(base: str, tuned: str) -> testing.AppTest:
    return submit("data.py", "Run analysis", {("text_input", 0): base, ("text_area", 0): tuned})


def follow_page(run: str, base: str) -> testing.AppTest:
    return submit("live.py", "Follow", {("text_input", 0): run, ("text_input", 1): base})


def inside_table(ckpts, root: Path, ref: str):
    """A table like one the visitor analysed, whose rows name ``ref``."""
    table = da.analyze(root / "base.safetensors", root / "run" / "checkpoint-10",
                       modules=("q",))
    table["ref"] = ref
    return table


def drilldown_page(table, base: str) -> testing.AppTest:
    at = page("drilldown.py", table=table, source="test")
    at.text_input(key="drilldown_base").input(base)
    return at.run()


def refused(at, message: str) -> bool:
    return not at.exception and any(e.value.endswith(message) or message in e.value
                                    for e in at.error)


def try_data(root, ckpts, typed: str, message: str) -> None:
    at = data_page("base.safetensors", typed)  # the tuned checkpoint outside
    assert refused(at, message) and "table" not in at.session_state
    at = data_page(typed, "run")  # the base outside
    assert refused(at, message) and "table" not in at.session_state


def try_follow(root, ckpts, typed: str, message: str) -> None:
    at = follow_page(typed, "base.safetensors")
    assert refused(at, message) and "table" not in at.session_state
    at = follow_page("run", typed)
    assert refused(at, message) and "table" not in at.session_state


def try_drilldown(root, ckpts, typed: str, message: str) -> None:
    table = inside_table(ckpts, root, str(root / "run" / "checkpoint-10"))
    at = drilldown_page(table, typed)  # the base outside
    assert refused(at, message) and not at.get("plotly_chart")
    at = drilldown_page(inside_table(ckpts, root, typed), "base.safetensors")  # a row's ref
    assert refused(at, message) and not at.get("plotly_chart")


def two_runs(ckpts, root: Path, ref: str):
    """A table of two runs, the second's rows naming ``ref``."""
    import pandas as pd

    first = inside_table(ckpts, root, str(root / "run" / "checkpoint-10")).assign(checkpoint="a")
    return pd.concat([first, inside_table(ckpts, root, ref).assign(checkpoint="b")],
                     ignore_index=True)


def crossrun_page(table, base: str) -> testing.AppTest:
    at = page("crossrun.py", table=table, source="test")
    at.text_input[0].input(base)
    next(b for b in at.button if b.label == "Compare runs").click()
    return at.run()


def try_crossrun(root, ckpts, typed: str, message: str) -> None:
    at = crossrun_page(two_runs(ckpts, root, "run/checkpoint-10"), typed)  # the base outside
    assert refused(at, message) and "cross_run" not in at.session_state
    at = crossrun_page(two_runs(ckpts, root, typed), "base.safetensors")  # a row's ref
    assert refused(at, message) and "cross_run" not in at.session_state


def shows_only(name: str):
    """Pages that read no path: given a table whose rows name paths outside, they show it and
    read nothing."""

    def run(root, ckpts, typed: str, message: str) -> None:
        at = page(name, table=inside_table(ckpts, root, typed), source="test")
        assert not at.exception and not at.error

    return run


#: Each page and how to give it paths; a page missing here fails test_every_page_is_tried.
DRIVERS = {
    "data.py": try_data,
    "live.py": try_follow,
    "drilldown.py": try_drilldown,
    "crossrun.py": try_crossrun,
    "figures.py": shows_only("figures.py"),
    "tables.py": shows_only("tables.py"),
}


def test_every_page_is_tried():
    assert set(DRIVERS) == set(PAGES)


@pytest.mark.parametrize("way", ["absolute", "dot-dot", "link out", "folder holding a link out"])
@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_pages_refuse_paths_outside_the_root(root, ckpts, reads, name, way):
    typed, message = outside(root, ckpts)[way]
    DRIVERS[name](root, ckpts, typed, message)
    assert read_outside(reads, root) == []


def test_pages_still_read_inside_the_root(root, ckpts, reads):
    """The same pages work with paths inside (so the refusals above are not an accident)."""
    at = data_page("base.safetensors", "run")
    assert not at.exception and not at.error and set(at.session_state["table"]["step"]) == {10}
    at = follow_page("run", "base.safetensors")
    assert not at.exception and not at.error and "1 step" in at.success[0].value
    table = inside_table(ckpts, root, "run/checkpoint-10")
    at = drilldown_page(table, "base.safetensors")
    assert not at.exception and not at.error and len(at.get("plotly_chart")) == 1
    at = crossrun_page(two_runs(ckpts, root, "run/checkpoint-10"), "base.safetensors")
    cross = at.session_state["cross_run"]  # the run against itself: the same update
    assert not at.exception and not at.error and (cross["update_cosine"] == 1.0).all()
    assert reads and read_outside(reads, root) == []


#: Library functions that read files: pages reach them only through cache (which takes
#: references that passed the access check), never directly.
READERS = {"analyze", "analyze_model", "matrix_detail", "read_table", "compare_runs", "plan",
           "expand_tuned",
           "open_checkpoint", "open_source", "resolve", "CheckpointRef", "series_steps",
           "load_file", "safe_open"}
#: Ways to reach the disk, or to vouch for a path, without the access check.
UNCHECKED = {"open", "Path", "PurePath", "Readable", "UploadedAdapter", "file_identity",
             "listdir", "scandir", "walk", "glob", "rglob", "iterdir", "read_bytes", "read_text"}


def forbidden_uses(source: str) -> list[str]:
    """The names in ``source`` that would read a path a visitor gave without the check."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dora_analysis"):
            if (node.module or "").startswith("dora_analysis.io"):
                found.append(f"import from {node.module}")
            found += [f"import {a.name}" for a in node.names if a.name in READERS]
        elif isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else ""
            if owner in {"da", "dora_analysis"} and node.attr in READERS:
                found.append(f"{owner}.{node.attr}")
            elif node.attr in UNCHECKED or (owner in {"cache", "follow", "access"}
                                            and node.attr.startswith("_")):
                found.append(f"{owner or '…'}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in UNCHECKED:
            here = [a for a in node.args if isinstance(a, ast.Name) and a.id == "__file__"]
            if not here:  # Path(__file__): the page finding the app's own folder
                found.append(f"{node.func.id}(…)")
    return found


@pytest.mark.parametrize("view", PAGES)
def test_pages_never_read_a_path_themselves(view):
    assert forbidden_uses((VIEWS / view).read_text()) == []


def test_the_scan_catches_direct_reads():
    sample = ("import dora_analysis as da\nfrom dora_analysis.io.open import open_checkpoint\n"
              "da.matrix_detail(base, ref, name)\nopen(path)\nPath(text).read_bytes()\n"
              "cache._analyze(1)\nReadable(text)\nPath(__file__)\n")
    assert sorted(forbidden_uses(sample)) == sorted([
        "import from dora_analysis.io.open", "import open_checkpoint", "da.matrix_detail",
        "open(…)", "….read_bytes", "Path(…)", "cache._analyze", "Readable(…)"])


def test_the_app_readers_refuse_unchecked_strings(ckpts):
    from dora_analysis.app import cache

    with pytest.raises(TypeError, match="has not been through the dashboard's access check"):
        cache.analyze(str(ckpts["base"]), str(ckpts["tuned"]), "", "auto", "out", None)
