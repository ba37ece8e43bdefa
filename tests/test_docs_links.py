"""Every document the code cites exists, and every link between the docs pages resolves.

- A ``.py`` file under framework/, plugins/, tests/ or benchmarks/ that names a Markdown file
  (a docstring's "docs/math.md §3") names a file of the repository, relative to its root, and
  every section it cites right after the path (``§3``, ``§2 and §7``, ``§2–3``, ``section 1``)
  is a heading of that file (``## §3 ...``). Names of files the code *writes* are not citations.
- A relative link in docs/*.md points to a file inside docs/ (the folder a MkDocs site serves),
  and its ``#anchor``, or a ``§N`` right after the link, to a heading of the target.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CODE_DIRS = ("framework", "plugins", "tests", "benchmarks")
#: names of files the code writes (into a run directory): outputs, not documents it cites
OUTPUT_NAMES = frozenset({"report.md", "table.md", "aggregate.md"})

#: a Markdown path not inside a longer path or a URL, and the section numbers cited after it
CITATION = re.compile(
    r"(?<![\w./:-])(?P<path>[\w.-]+(?:/[\w.-]+)*\.md)\b"
    r"(?P<sections>\s+(?:§|section\s+)\d+(?:\s*(?:,|and|[–-])\s*§?\d+)*)?"
)
#: an inline Markdown link or image, and the section numbers cited right after it
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)(?P<sections>\s+§\d+(?:\s*(?:,|and|[–-])\s*§?\d+)*)?")
SECTION_HEADING = re.compile(r"^#{1,6}\s+§(\d+)\b")
FENCE = re.compile(r"^\s*(```|~~~)")


def cited_sections(text: str | None) -> list[int]:
    """``" §2 and §7"`` -> [2, 7]; ``" §2–4"`` -> [2, 3, 4]; ``None`` -> []."""
    if not text:
        return []
    numbers: list[int] = []
    for match in re.finditer(r"(\d+)(?:\s*[–-]\s*§?(\d+))?", text):
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) else low
        numbers.extend(range(low, high + 1))
    return numbers


def heading_lines(markdown: str) -> list[str]:
    """The heading lines of a Markdown text, code fences skipped."""
    headings, fenced = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            headings.append(line)
    return headings


def section_numbers(markdown: str) -> set[int]:
    return {int(m.group(1)) for line in heading_lines(markdown)
            if (m := SECTION_HEADING.match(line))}


def slugify(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (MkDocs' default) gives a heading line."""
    text = re.sub(r"^#+\s*", "", heading).strip()
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def citation_problems(root: Path, dirs: tuple[str, ...] = CODE_DIRS) -> list[str]:
    """``file:line: ...`` for every cited Markdown path or section under ``root/dirs`` that
    does not exist."""
    problems = []
    for top in dirs:
        for path in sorted((root / top).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for match in CITATION.finditer(text):
                cited = match.group("path")
                if cited in OUTPUT_NAMES:
                    continue
                where = f"{path.relative_to(root)}:{text.count(chr(10), 0, match.start()) + 1}"
                target = root / cited
                if not target.is_file():
                    problems.append(f"{where}: cites '{cited}', which is not a file of the "
                                    f"repository (paths are relative to its root)")
                    continue
                have = section_numbers(target.read_text(encoding="utf-8"))
                for number in cited_sections(match.group("sections")):
                    if number not in have:
                        problems.append(f"{where}: cites '{cited} §{number}', but {cited} has "
                                        f"no heading '§{number}'")
    return problems


def link_problems(docs: Path) -> list[str]:
    """``page: ...`` for every relative link of ``docs/*.md`` that does not resolve."""
    problems = []
    for page in sorted(docs.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(docs.parent)
        for match in LINK.finditer(text):
            target = match.group("target")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            if not resolved.is_file():
                problems.append(f"{name}: link '{target}' points to a missing file")
                continue
            if docs.resolve() not in resolved.parents:
                problems.append(f"{name}: link '{target}' leaves docs/ (a MkDocs site cannot "
                                f"serve it; cite the path as code instead)")
                continue
            if resolved.suffix != ".md":
                continue
            markdown = resolved.read_text(encoding="utf-8")
            if anchor and anchor not in {slugify(h) for h in heading_lines(markdown)}:
                problems.append(f"{name}: link '{target}': no heading with anchor '#{anchor}'")
            have = section_numbers(markdown)
            for number in cited_sections(match.group("sections")):
                if number not in have:
                    problems.append(f"{name}: link '{target}' §{number}: no heading '§{number}'")
    return problems


def test_code_cites_only_documents_and_sections_that_exist():
    problems = citation_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_docs_links_resolve():
    assert DOCS.is_dir(), "docs/ is missing"
    problems = link_problems(DOCS)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# the checks themselves can fail (file names are built with MD, so that this file cites nothing)

MD = ".md"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / f"guide{MD}").write_text(
        "# Guide\n\n## §1 Start\n\n```\n## §9 not a heading\n```\n## The `end` part\n")
    (tmp_path / "framework").mkdir()
    return tmp_path


def test_citation_check_flags_missing_files_and_sections(tree: Path):
    (tree / "framework" / "mod.py").write_text(
        f'"""See docs/guide{MD} §1, NOTES{MD} and docs/guide{MD} §9 and §1; writes report{MD};\n'
        f'https://example.org/x/README{MD} is a URL."""\n')
    problems = citation_problems(tree, ("framework",))
    assert len(problems) == 2, problems
    assert problems[0].startswith("framework/mod.py:1: cites 'NOTES")
    assert problems[1].startswith(f"framework/mod.py:1: cites 'docs/guide{MD} §9'")


def test_link_check_flags_missing_targets_anchors_sections_and_escapes(tree: Path):
    (tree / f"README{MD}").write_text("# Readme\n")
    (tree / "docs" / f"index{MD}").write_text(
        f"[ok](guide{MD}) §1, [anchor](guide{MD}#1-start), [code](guide{MD}#the-end-part), "
        f"[web](https://example.org/a{MD})\n"
        f"[gone](missing{MD}), [bad anchor](guide{MD}#nope), [section](guide{MD}) §2, "
        f"[outside](../README{MD})\n")
    problems = link_problems(tree / "docs")
    assert [p.split("'")[1] for p in problems] == [
        f"missing{MD}", f"guide{MD}#nope", f"guide{MD}", f"../README{MD}"], problems


def test_cited_sections_parses_lists_and_ranges():
    assert cited_sections(" §2 and §7") == [2, 7]
    assert cited_sections(" §2–4") == [2, 3, 4]
    assert cited_sections(" section 1") == [1]
    assert cited_sections(None) == []
