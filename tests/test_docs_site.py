"""The MkDocs site (mkdocs.yml): its nav lists every page of docs/ once and nothing else, and its
API reference pages name modules that import. (``mkdocs build --strict`` itself runs in .ci/run,
with the ``docs`` extra installed.)"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: a nav entry ``- Title: <page>`` (or a bare ``- <page>``), the page a Markdown file
NAV_PAGE = re.compile(r"^\s*-\s+(?:[^:\n]+:\s+)?(?P<page>[\w./-]+\.md)\s*$", re.M)


def nav_pages(mkdocs_yml: str) -> list[str]:
    nav = mkdocs_yml[mkdocs_yml.index("\nnav:"):]
    return [m.group("page") for m in NAV_PAGE.finditer(nav)]


def test_nav_lists_every_page_once():
    pages = nav_pages((ROOT / "mkdocs.yml").read_text())
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert len(pages) == len(set(pages)), "a page is listed twice"
    assert sorted(pages) == on_disk


def test_reference_pages_name_importable_modules():
    for page in sorted((DOCS / "reference").glob("*.md")):
        modules = re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M)
        assert modules, f"{page.name} documents no module"
        for module in modules:
            importlib.import_module(module)


MD = ".md"  # file names built with it, so that this file cites no document


def test_nav_parser_sees_titled_and_bare_entries():
    text = f"site_name: x\nnav:\n  - Home: index{MD}\n  - Group:\n      - a/b{MD}\n      - T: c{MD}\n"
    assert nav_pages(text) == [f"index{MD}", f"a/b{MD}", f"c{MD}"]
