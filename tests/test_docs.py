"""The design lives in the repository: every design reference in code and docs points at a page that
exists (ARCHITECTURE.md, docs/*.md), and the pages' relative links resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("store", "harvester", "trainer", "evaluator", "dynsae", "bench", "tests", "deploy", "docs")
DOC_REF = re.compile(r"\bdocs/([A-Za-z0-9_-]+\.md)")
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "ARCHITECTURE.md"]
    for folder in SOURCES:
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml"))
    return [f for f in files if f.is_file()]


def test_no_reference_to_a_design_document_the_repository_lacks():
    stale = [f"{p.relative_to(ROOT)}:{n}" for p in text_files() if p.name != "test_docs.py"
             for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"DESIGN(\.md)? ?§", line)]
    assert not stale, "references to the old design file's sections (cite docs/<page>.md instead): " + ", ".join(stale)


def test_every_cited_docs_page_exists():
    cited = {(p.relative_to(ROOT), m) for p in text_files() for m in DOC_REF.findall(p.read_text())}
    missing = sorted(f"{where}: docs/{page}" for where, page in cited if not (ROOT / "docs" / page).is_file())
    assert not missing, "cited pages that do not exist: " + ", ".join(missing)
    assert {page for _, page in cited} >= {"metrics.md", "run-format.md", "store-format.md", "sweep.md", "variants.md"}


def test_relative_links_of_the_design_pages_resolve():
    pages = [ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in pages for target in MD_LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, "broken links: " + ", ".join(broken)
