"""The README stays a page, every relative link in the README and docs/ resolves, the citation metadata
matches the package, and every results page says where its figures came from."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(DOCS.rglob("*.md"))

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _prose(text: str) -> str:
    """Markdown without fenced code blocks (links inside code are examples, not links)."""
    return FENCE.sub("", text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(_prose(path.read_text())):
        slug = github_anchor(title)
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link as written, the file it points at, anchor or '') for every relative link of a page."""
    out = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto: ...
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        out.append((target, dest, anchor))
    return out


def test_readme_is_a_page():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines (at most 200: move detail to docs/)"


def test_readme_has_the_python_section():
    """The section the API example goes into (placeholder until the example is filled in)."""
    assert re.search(r"^## Python\s*$", README.read_text(), re.MULTILINE)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target, dest, anchor in relative_links(page):
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_code_and_configs_point_at_pages_not_at_the_readme():
    """Code, configs and the workflow cite a documentation page (``docs/...md``, ``data/pretrained/README.md``),
    never "the README", whose detail moves to docs/."""
    bare = re.compile(r"(?<![\w/])README(?!\.md)|(?<![\w/.-])README\.md")
    files = [f for d in ("pipeline", "config", "workflow") for f in (ROOT / d).rglob("*")
             if f.suffix in {".py", ".yaml", ".smk"}] + [ROOT / "Snakefile", ROOT / "Makefile"]
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files if f.is_file()
            for i, line in enumerate(f.read_text().splitlines(), 1) if bare.search(line)]
    assert not hits, "cite the page instead of the README:\n" + "\n".join(hits)


def test_link_checker_catches_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "p.md"
    (tmp_path / "q.md").write_text("# Title\n\n## The `make demo` run (CPU)\n")
    page.write_text("[ok](q.md#the-make-demo-run-cpu) [gone](nope.md) [bad anchor](q.md#missing) "
                    "[web](https://example.org/x.md)\n```\n[in code](ignored.md)\n```\n")
    links = {t: (d.exists(), a in anchors(d) if d.exists() and a else None) for t, d, a in relative_links(page)}
    assert links == {"q.md#the-make-demo-run-cpu": (True, True), "nope.md": (False, None),
                     "q.md#missing": (True, False)}


def test_readme_links_the_user_docs():
    targets = {dest for _, dest, _ in relative_links(README)}
    for doc in ("observations.md", "posterior-files.md", "cluster.md", "method.md", "results/lensing.md",
                "results/experiments.md", "README.md"):
        assert (DOCS / doc).resolve() in targets, f"README.md does not link docs/{doc}"


def test_docs_index_lists_every_page():
    """docs/README.md has a line for every page under docs/ (results pages included)."""
    index = {dest for _, dest, _ in relative_links(DOCS / "README.md")}
    pages = [p for p in DOCS.glob("*.md") if p.name != "README.md"] + list((DOCS / "results").glob("*.md"))
    missing = sorted(str(p.relative_to(DOCS)) for p in pages if p.resolve() not in index)
    assert not missing, f"docs/README.md does not list: {missing}"


def test_citation_file_matches_the_package():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    project = _pyproject()
    for key in ("cff-version", "message", "title", "authors", "version", "license", "references"):
        assert cff.get(key), f"CITATION.cff: missing {key}"
    assert cff["cff-version"] == "1.2.0"
    assert str(cff["version"]) == project["version"]
    assert cff["license"] == project["license"] == "MIT"
    assert all(a.get("name") or a.get("family-names") for a in cff["authors"])
    titles = {r["title"] for r in cff["references"]}
    assert "Amortizing intractable inference in diffusion models for vision, language, and control" in titles
    assert any(t.startswith("Caustics") for t in titles)
    for ref in cff["references"]:
        assert ref["type"] and ref["authors"] and ref["year"], f"CITATION.cff: incomplete reference {ref['title']}"


def test_licence_is_the_declared_one():
    text = (ROOT / "LICENSE").read_text()
    assert _pyproject()["license"] == "MIT" and text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text


def test_generated_results_page_names_its_origin():
    """docs/results/lensing.md (rendered by `make demo`) names its command, commit, machine and the
    summary JSONs, and those JSONs are committed beside it."""
    page = DOCS / "results" / "lensing.md"
    text = page.read_text()
    m = re.search(r"Made by `([^`]+)` at commit `([0-9a-f]{7,40})[^`]*`.*? on (.+?), on \d{4}-\d\d-\d\d, "
                  r"from the calibration summaries (.+?) \(copied", text, re.DOTALL)
    assert m, "lensing.md: no provenance sentence"
    assert m.group(1) and re.search(r"\d+ cores", m.group(3))
    jsons = re.findall(r"`([^`]+\.json)`", m.group(4))
    assert jsons and all((page.parent / j).is_file() for j in jsons), jsons


def test_experiments_page_names_the_origin_of_every_section():
    """docs/results/experiments.md is written by hand: its provenance table has a row (command, commit,
    machine, JSON) for every section, and every JSON it names is committed."""
    page = DOCS / "results" / "experiments.md"
    text = page.read_text()
    table = text.split("## Provenance", 1)[1].split("\n### ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]
    assert rows, "experiments.md: no provenance table"
    sections = [t for h, t in HEADING.findall(_prose(text)) if len(h) == 3]
    named = [r[0] for r in rows]
    for title in sections:
        assert any(title.startswith(n) for n in named), f"experiments.md: no provenance row for '{title}'"
    for section, command, commit, machine, json_cell in rows:
        assert command and machine, f"experiments.md: provenance row '{section}' lacks command or machine"
        assert re.search(r"\b[0-9a-f]{7,40}\b", commit), f"experiments.md: row '{section}' names no commit"
        for name in re.findall(r"`([^`]+\.json(?:\.gz)?)`", json_cell):
            assert (ROOT / name).is_file(), f"experiments.md: row '{section}' names missing {name}"
