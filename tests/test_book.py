"""The book's structure: every chapter follows the conventions of DESIGN.md."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def toc_files() -> list[str]:
    files = [TOC["root"]]
    for part in TOC.get("parts", []):
        files += [chapter["file"] for chapter in part["chapters"]]
    return files


CHAPTERS = [ROOT / f"{f}.ipynb" for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]


def code_cells(path: Path) -> list[nbformat.NotebookNode]:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_toc_lists_only_files_that_exist():
    for f in toc_files():
        assert any((ROOT / f"{f}{ext}").exists() for ext in (".md", ".ipynb")), f


def test_every_notebook_under_book_is_in_the_toc():
    listed = {p.resolve() for p in CHAPTERS}
    assert {p.resolve() for p in (ROOT / "book").rglob("*.ipynb") if "_build" not in p.parts} == listed


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_conventions(path):
    cells = code_cells(path)
    # The Colab install cell comes first and installs from the one repository address.
    assert "google.colab" in cells[0].source
    assert f"robustdl @ git+{CONFIG['repository']['url']}" in cells[0].source
    # A papermill parameters cell, with the results path robustdl.experiments sets.
    parameters = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "results_path" in parameters[0].source
    # Claims checked in a hidden cell; results saved for sweeps.
    hidden = [c for c in cells if {"remove-cell", "remove-input"} & set(c.metadata.get("tags", []))]
    assert any("assert" in c.source for c in hidden)
    assert any("save_results(" in c.source for c in cells)
    # Exercises in nbgrader form, each followed by a check.
    assert sum(c.source.count("### BEGIN SOLUTION") for c in cells) >= 2
    # Outputs from a real, complete, in-order run.
    counts = [c.execution_count for c in cells if c.source.strip()]
    assert None not in counts and counts == sorted(counts)
    assert not any(o.output_type == "error" for c in cells for o in c.outputs)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_citations_resolve(path):
    keys = set(re.findall(r"@\w+\{([^,]+),", (ROOT / "book/references.bib").read_text()))
    text = "".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    cited = {k.strip() for group in re.findall(r"\{cite[pt]?\}`([^`]+)`", text) for k in group.split(",")}
    assert cited and cited <= keys, cited - keys
