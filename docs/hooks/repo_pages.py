"""An mkdocs hook: pages whose text is a file of the repository, kept in one place.

``docs/contributing.md`` shows ``CONTRIBUTING.md``; its links into ``docs/`` are made relative to
the site (``docs/layout.md`` → ``layout.md``), so they work in both places.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Site page → the repository file it shows.
PAGES = {"contributing.md": "CONTRIBUTING.md"}


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    source = PAGES.get(page.file.src_uri)
    if source is None:
        return markdown
    return (ROOT / source).read_text(encoding="utf-8").replace("](docs/", "](")
