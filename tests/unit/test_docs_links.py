"""The README's and docs/' links to files and sections of this repo lead somewhere: the README
was split into docs/ (2026-12-06), and a section renamed or moved must not leave a dead link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "RELIABILITY.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_within_the_repo_leads_to_a_file_and_section_that_exist(doc):
    dead = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (doc.parent / path).resolve() if path else doc
        if not where.exists():
            dead.append(f"{target}: no {where.relative_to(REPO) if where.is_relative_to(REPO) else where}")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            dead.append(f"{target}: no such section in {where.relative_to(REPO)}")
    assert not dead, dead


def test_github_anchors_are_made_as_github_makes_them():
    assert slug("fvboot's own start") == "fvboots-own-start"
    assert slug("Measured, not adopted") == "measured-not-adopted"
    assert slug("`docker run` of the baked image (H200 and H100, 2026-12-03 to 06)") == \
        "docker-run-of-the-baked-image-h200-and-h100-2026-12-03-to-06"
