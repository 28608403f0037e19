"""The README and the documentation site: the site builds strictly, the README stays short and free of
machine paths, its results table cannot drift from benchmarks/RESULTS.md, and the nav names real pages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MKDOCS = ROOT / "mkdocs.yml"
DOCS = ROOT / "docs"
README_MAX_LINES = 150
# An absolute path of a machine: a run folder, a home directory, a checkout.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|tmp|root)/")
DECIMAL = re.compile(r"\d+\.\d+")
MEAN_STD = re.compile(r"\d+\.\d+ ± \d+\.\d+")


def results_table(readme: str) -> list[str]:
    """The rows of the table in the README's ``## Results`` section (header and rule excluded)."""
    section = re.search(r"^## Results\n(.*?)(?=^## |\Z)", readme, flags=re.M | re.S)
    assert section, "README.md has no '## Results' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")]
    assert len(rows) > 2, "the '## Results' section has no table"
    return rows[2:]


def nav_pages(nav) -> list[str]:
    """Every page file named in an mkdocs nav (nested lists and {title: page} entries)."""
    if isinstance(nav, str):
        return [] if "://" in nav else [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for entry in nav for page in nav_pages(entry)]


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing page, snippet or API object fails it."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reproduction = (tmp_path / "site" / "reproduction" / "index.html").read_text()
    assert "figures/" in reproduction, "RESULTS.md's figures are not on the reproduction page"
    for figure in (ROOT / "benchmarks" / "figures").glob("*.png"):
        assert (tmp_path / "site" / "figures" / figure.name).is_file(), figure.name


def test_readme_is_short_and_has_no_machine_paths():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    found = [(number, line) for number, line in enumerate(lines, 1) if MACHINE_PATH.search(line)]
    assert not found, f"absolute machine paths in README.md: {found}"


def test_docs_have_no_machine_paths():
    found = [
        (str(page.relative_to(ROOT)), number)
        for page in sorted(DOCS.rglob("*.md"))
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]
    assert not found, f"absolute machine paths in docs/: {found}"


def test_readme_results_table_figures_are_in_results_md():
    """Every figure of the README's results table appears verbatim in benchmarks/RESULTS.md, and so does
    every `mean ± std` pair, so the README cannot drift from the one file that holds the measurements."""
    results = RESULTS.read_text()
    rows = results_table(README.read_text())
    figures = [figure for row in rows for figure in DECIMAL.findall(row)]
    pairs = [pair for row in rows for pair in MEAN_STD.findall(row)]
    assert len(figures) >= 10 and pairs, "the README's results table holds (almost) no figures"
    missing = sorted({figure for figure in figures if figure not in results} | {pair for pair in pairs if pair not in results})
    assert not missing, f"README results-table figures not in benchmarks/RESULTS.md: {missing}"


def test_nav_pages_exist():
    config = yaml.safe_load(MKDOCS.read_text())
    docs_dir = ROOT / config.get("docs_dir", "docs")
    pages = nav_pages(config["nav"])
    assert pages, "mkdocs.yml has an empty nav"
    missing = [page for page in pages if not (docs_dir / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist: {missing}"


def test_reproduction_page_includes_results_md_rather_than_copying_it():
    page = (DOCS / "reproduction.md").read_text()
    assert '--8<-- "benchmarks/RESULTS.md"' in page
    assert not DECIMAL.search(page.replace('--8<-- "benchmarks/RESULTS.md"', "")), "figures typed into reproduction.md"
