"""The README is a front door (≤ 200 lines) whose links lead somewhere, and every page of docs/ is
on the site's navigation; `mkdocs build --strict` (CI) checks the site's own links."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_every_local_link_of_the_readme_and_contributing_exists():
    for name in ("README.md", "CONTRIBUTING.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        targets = [t for t in LINK.findall(text) if "://" not in t]
        assert targets, name
        missing = [t for t in targets if not (ROOT / t).exists()]
        assert missing == [], f"{name} links to {missing}"


def test_every_page_is_on_the_navigation():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r":\s+([\w/.-]+\.md)\s*$", config, re.M))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")
             if not p.relative_to(ROOT / "docs").as_posix().startswith("reproduction/")}
    assert pages - nav == set(), "add these pages to mkdocs.yml's nav"
    assert nav - pages == set(), "mkdocs.yml names pages that do not exist"


def test_the_api_pages_show_every_public_name():
    import dora_analysis
    import dora_analysis.metrics as metrics

    pages = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs" / "api").glob("*.md"))
    shown = {m.rsplit(".", 1)[-1] for m in re.findall(r"^::: ([\w.]+)", pages, re.M)}
    listed = set(re.findall(r"members: \[([^\]]*)\]", pages))
    shown |= {n.strip() for group in listed for n in group.split(",")}
    names = (set(dora_analysis.__all__) - {"__version__"}) | set(metrics.FUNCTIONS)
    assert names - shown == set(), "add these names to docs/api/"
