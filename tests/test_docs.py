"""The front door holds: the README is short, its figures and docs/results.md are what
bench/tables.py writes from the committed JSON, every link resolves, and every result file is read
by a page or a script."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from tests.test_bench import bench_module

REPO = Path(__file__).resolve().parents[1]
# docs/demo-report.md and demo-ratio-report.md are copies of runs' own report.md, whose links point into their dirs
DOCS = [page for page in (REPO / "docs").glob("*.md") if page.name not in ("demo-report.md", "demo-ratio-report.md")]
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "bench" / "README.md", *DOCS]


def test_generated_pages_match_the_committed_results():
    stale = bench_module("tables").stale_pages()
    assert stale == [], f"run `python bench/tables.py`: {[str(p.relative_to(REPO)) for p in stale]} differ"


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    headings = [line for line in lines if line.startswith("## ")]
    for wanted in ("## Quickstart", "## Which method should I use?", "## Command line", "## Python"):
        assert wanted in headings


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []


def test_every_result_file_is_read_by_a_page_or_a_script():
    """A result file no page cites and no script reads is a superseded run: git keeps it, main does not."""
    cited = " ".join(page.read_text(encoding="utf-8") for page in PAGES)
    cited += " ".join(path.read_text(encoding="utf-8") for path in (REPO / "bench").glob("*.py"))
    names = set(re.findall(r"[\w.*-]+\.(?:json|png)", cited))
    files = sorted(path for path in (REPO / "bench" / "results").rglob("*") if path.is_file())
    orphans = [path.name for path in files if not any(fnmatch.fnmatchcase(path.name, name) for name in names)]
    assert files and orphans == []


def test_result_files_sit_in_the_folder_of_the_script_that_writes_them():
    folders = [path for path in (REPO / "bench" / "results").iterdir()]
    assert all(path.is_dir() and (REPO / "bench" / f"{path.name}.py").is_file() for path in folders)
