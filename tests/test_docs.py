"""The README stays a guide: short, with the reference pages in docs/ linked from it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_a_guide_that_links_every_reference_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages and linked == pages, linked ^ pages


def test_every_relative_link_of_the_docs_resolves():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
