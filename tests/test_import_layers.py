"""The imports point one way, down the layers of STYLE.md (and /work/shared/layers.json).

Every module of the package (and the dashboard) is parsed with :mod:`ast`; every import counts,
at module level, inside functions (lazy) and under ``TYPE_CHECKING`` alike, and
``importlib.import_module("dora_analysis.…")`` with a literal name too. An import may point to
its own part or to a lower one, never up and never sideways between maths and io; and no
modules import each other in a circle.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The layers, bottom first: (part, the paths it is made of). A module belongs to the part whose
#: path is the longest prefix of its own. Parts on one line of LAYERS share a rank and may not
#: import each other (maths and io side by side).
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"base": ("dora_analysis/errors.py", "dora_analysis/columns.py",
              "dora_analysis/hardware.py", "dora_analysis/exits.py",
              "dora_analysis/cache/location.py")},
    {"maths": ("dora_analysis/decompose.py", "dora_analysis/kernel.py", "dora_analysis/lowrank.py"),
     "io": ("dora_analysis/io/",)},
    # Writing files whole or not at all: used by training, caches and reports alike.
    {"files": ("dora_analysis/atomic.py",)},
    {"pairs": ("dora_analysis/pairs.py", "dora_analysis/merged.py")},
    {"metrics": ("dora_analysis/metrics/",)},
    {"settings": ("dora_analysis/config.py",)},
    # Training depends on the core only (see TRAINING_MAY_USE).
    {"training": ("dora_analysis/training/",)},
    {"run": ("dora_analysis/jobs.py", "dora_analysis/plan.py", "dora_analysis/rows.py",
             "dora_analysis/vanished.py", "dora_analysis/cache/",
             "dora_analysis/executors.py", "dora_analysis/integrations/dask.py",
             "dora_analysis/analysis.py", "dora_analysis/inmemory.py",
             "dora_analysis/tensors.py", "dora_analysis/drilldown.py",
             "dora_analysis/crossrun.py")},
    {"stats": ("dora_analysis/stats.py",)},
    {"present": ("dora_analysis/plots.py", "dora_analysis/heatmaps.py",
                 "dora_analysis/report.py", "dora_analysis/tables.py")},
    {"callback": ("dora_analysis/integrations/transformers.py",
                  "dora_analysis/integrations/__init__.py")},
    {"faces": ("dora_analysis/cli.py", "dora_analysis/console.py",
               "dora_analysis/training/cli.py", "dora_analysis/__init__.py")},
    {"app": ("dora_analysis/app/", "app/")},
]

#: "Training depends on decompose and io only" (STYLE.md), with the ground under them.
TRAINING_MAY_USE = {"base", "maths", "io", "files", "training"}

#: Known arrows that break the order, each with why it is still here. An entry that no longer
#: exists fails the test: remove it, so the list only ever shrinks.
ALLOWED: dict[tuple[str, str], str] = {}


def part_of(path: str) -> str | None:
    """The part a module (a path relative to the repository) belongs to."""
    best, found = "", None
    for layer in LAYERS:
        for part, prefixes in layer.items():
            for prefix in prefixes:
                if path.startswith(prefix) and len(prefix) > len(best):
                    best, found = prefix, part
    return found


RANK = {part: rank for rank, layer in enumerate(LAYERS) for part in layer}


def allowed(source: str, target: str) -> bool:
    """Whether part ``source`` may import part ``target``."""
    if source == target:
        return True
    if source == "training":
        return target in TRAINING_MAY_USE
    return RANK[target] < RANK[source]


def modules(root: Path) -> list[Path]:
    """Every Python module of the package and of the dashboard under ``root``."""
    return sorted(p for top in ("dora_analysis", "app") for p in (root / top).rglob("*.py"))


def resolve(root: Path, dotted: str) -> str | None:
    """``a.b.c`` → the file it names under ``root`` (module or package), or None."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def package_of(root: Path, path: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1]


def imports(root: Path, path: Path) -> set[str]:
    """The files of this tree that ``path`` imports, wherever the import stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = package_of(root, path)
    found: set[str] = set()

    def add(dotted: str, names: list[str]) -> None:
        # `from pkg import name` imports the module pkg/name when there is one, else pkg.
        hits = [resolve(root, f"{dotted}.{n}") for n in names] if names else []
        found.update(h for h in hits if h)
        if not hits or not all(hits):
            target = resolve(root, dotted)
            if target:
                found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package[: len(package) - node.level + 1]
                dotted = ".".join(up + ([node.module] if node.module else []))
            else:
                dotted = node.module or ""
            add(dotted, [a.name for a in node.names if a.name != "*"])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr",
                                                      getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            add(node.args[0].value, [])
    found.discard(path.relative_to(root).as_posix())
    return found


def graph(root: Path) -> dict[str, set[str]]:
    """Module → the modules of this tree it imports (the package's own ``__init__`` files that
    merely run on the way to a submodule are not counted: only what is named)."""
    return {p.relative_to(root).as_posix(): imports(root, p) for p in modules(root)}


def upward(edges: dict[str, set[str]], allowed_edges=ALLOWED) -> list[str]:
    """Every import that points up or sideways, as ``a -> b (part -> part)``."""
    bad = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = part_of(source), part_of(target)
            if a is None or b is None:
                bad.append(f"{source} -> {target}: on no layer; add it to LAYERS")
            elif not allowed(a, b) and (source, target) not in allowed_edges:
                bad.append(f"{source} -> {target} ({a} -> {b})")
    return bad


def circles(edges: dict[str, set[str]], allowed_edges=ALLOWED) -> list[list[str]]:
    """The import circles (strongly connected components of two modules or more), Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if (node, nxt) in allowed_edges or nxt not in edges:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_is_on_a_layer_and_imports_point_down():
    assert upward(graph(ROOT)) == []


def test_no_import_circles():
    assert circles(graph(ROOT)) == []


def test_allowed_arrows_still_exist():
    """An allowed arrow that is gone is taken off the list, so the list only shrinks."""
    edges = graph(ROOT)
    assert [e for e in ALLOWED if e[1] not in edges.get(e[0], set())] == []


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def a_package(tmp_path: Path, decompose: str) -> Path:
    write(tmp_path, {
        "dora_analysis/__init__.py": "",
        "dora_analysis/errors.py": "",
        "dora_analysis/config.py": "from .errors import *\n",
        "dora_analysis/decompose.py": decompose,
        "dora_analysis/io/__init__.py": "",
        "dora_analysis/io/base.py": "from ..errors import *\n",
    })
    return tmp_path


def test_the_test_sees_a_lazy_import_up(tmp_path):
    root = a_package(tmp_path, """
        def f():
            from .config import AnalysisConfig
    """)
    assert upward(graph(root), {}) == [
        "dora_analysis/decompose.py -> dora_analysis/config.py (maths -> settings)"]


def test_the_test_sees_a_type_checking_import_up_and_a_sideways_one(tmp_path):
    root = a_package(tmp_path, """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from dora_analysis import config
        from .io.base import TensorSource
    """)
    assert upward(graph(root), {}) == [
        "dora_analysis/decompose.py -> dora_analysis/config.py (maths -> settings)",
        "dora_analysis/decompose.py -> dora_analysis/io/base.py (maths -> io)"]


def test_the_test_sees_a_circle_and_a_module_on_no_layer(tmp_path):
    root = a_package(tmp_path, "import importlib\nimportlib.import_module('dora_analysis.x')\n")
    write(tmp_path, {"dora_analysis/x.py": "from . import decompose\n"})
    edges = graph(root)
    assert circles(edges, {}) == [["dora_analysis/decompose.py", "dora_analysis/x.py"]]
    assert "dora_analysis/x.py -> dora_analysis/decompose.py: on no layer; add it to LAYERS" \
        in upward(edges, {})
