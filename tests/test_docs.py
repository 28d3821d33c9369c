"""Every ``§`` citation in the sources names a page of ``docs/`` and a section it has.

A citation is ``docs/<page>.md §N`` (or ``§N.M``); further ``§`` numbers close behind one
(``§2, §3``, ``§2-§6``) refer to the same page. Inside a page of ``docs/``, a ``§`` with no
page before it on its line refers to that page.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kit.repo import ROOT

SOURCES = [
    *sorted((ROOT / "blockd").rglob("*.py")),
    *sorted((ROOT / "tests").rglob("*.py")),
    *sorted((ROOT / "examples").rglob("*.py")),
    *sorted((ROOT / "docs").rglob("*.md")),
    ROOT / "README.md",
    ROOT / "schema" / "README.md",
]
PAGE = re.compile(r"docs/[\w./-]+?\.md")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
#: how far behind its page a section number may stand (a sentence or two)
REACH = 300


def _headings(page: Path) -> set[str]:
    found = set()
    for line in page.read_text().splitlines():
        m = re.match(r"#+ (\d+(?:\.\d+)?)\.? ", line)
        if m:
            found.add(m.group(1))
    return found


def citations() -> list[tuple[str, str, str]]:
    """(where, page, section) for every ``§`` in the sources."""
    found = []
    for path in SOURCES:
        if not path.exists() or path.name == "test_docs.py":
            continue
        text = path.read_text()
        own = str(path.relative_to(ROOT)) if path.parent.is_relative_to(ROOT / "docs") else None
        for m in SECTION.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            before = list(PAGE.finditer(text, max(0, m.start() - REACH), m.start()))
            on_line = [p for p in before if p.start() >= line_start]
            line_no = text.count("\n", 0, m.start()) + 1
            where = f"{path.relative_to(ROOT)}:{line_no}"
            if own is not None:
                page = on_line[-1].group(0) if on_line else own
            else:
                page = before[-1].group(0) if before else ""
            found.append((where, page, m.group(1)))
    return found


CITATIONS = citations()


def test_there_are_citations() -> None:
    assert len(CITATIONS) > 50


@pytest.mark.parametrize(("where", "page", "section"), CITATIONS, ids=[c[0] for c in CITATIONS])
def test_citation_resolves(where: str, page: str, section: str) -> None:
    assert page, f"{where}: §{section} names no docs/ page"
    target = ROOT / page
    assert target.is_file(), f"{where}: {page} does not exist"
    assert section in _headings(target), f"{where}: {page} has no section {section}"
