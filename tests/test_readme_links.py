"""The README is the front door and not part of the docs site (which `mkdocs build --strict`
checks): its links into docs/ must land on a page and a heading that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def slugs(page: Path) -> set[str]:
    """The anchors mkdocs gives a page's headings (lowercase, punctuation dropped)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {re.sub(r"\s+", "-", re.sub(r"[^\w\- ]", "", h.strip().lower()))
            for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_relative_link_in_the_readme_lands() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    relative = [link for link in links if not re.match(r"^[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in relative)
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.exists(), f"README links to {link}: no such file"
        if anchor:
            assert anchor in slugs(target), f"README links to {link}: no such heading"
