"""The students' version by nbgrader: every chapter releases, with stubs for solutions and no instructors' cells.

The autograde tests (marker ``autograde``) execute two cheap chapters twice each: the chapter
itself must score full marks, its untouched release zero on every check.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from robustdl.student import INSTRUCTOR_TAG, autograde, chapters, release

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = chapters(BOOK)


def graded(nb: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    """The cells of ``nb`` that carry nbgrader metadata, by grade id."""
    return {c.metadata.nbgrader["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}


def solution_lines(source: str) -> list[str]:
    """The non-blank lines between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` in ``source``."""
    inside, lines = False, []
    for line in source.splitlines():
        if "BEGIN SOLUTION" in line or "END SOLUTION" in line:
            inside = "BEGIN" in line
        elif inside and line.strip():
            lines.append(line.strip())
    return lines


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, nbformat.NotebookNode]:
    """Every chapter's release by nbgrader, read back, by the chapter's path."""
    target = tmp_path_factory.mktemp("student")
    paths = release(BOOK, target)
    assert paths == [target / p.relative_to(BOOK) for p in CHAPTERS]
    return {p: nbformat.read(target / p.relative_to(BOOK), as_version=4) for p in CHAPTERS}


def test_there_are_chapters():
    assert len(CHAPTERS) >= 13


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_is_an_nbgrader_cell(chapter: Path):
    cells = graded(nbformat.read(chapter, as_version=4)).values()
    meta = [c.metadata.nbgrader for c in cells]
    solutions = [m for m in meta if m["solution"] and not m["grade"]]
    checks = [c.metadata.nbgrader for c in cells if c.cell_type == "code" and c.metadata.nbgrader["grade"]]
    assert len(solutions) >= 2 and len(checks) >= 2, chapter
    assert all(m["locked"] and not m["solution"] and m["points"] > 0 for m in checks)
    assert all(m["schema_version"] == 3 for m in meta)
    for cell in nbformat.read(chapter, as_version=4).cells:  # every solution region lies in a solution cell
        assert "BEGIN SOLUTION" not in cell.source or cell.metadata.get("nbgrader", {}).get("solution"), cell.source


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_the_release_has_stubs_and_no_solutions(chapter: Path, released: dict[Path, nbformat.NotebookNode]):
    source, student = nbformat.read(chapter, as_version=4), released[chapter]
    original, stubbed = graded(source), graded(student)
    assert original.keys() == stubbed.keys() and len(original) >= 4
    text = "\n".join(c.source for c in student.cells)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text and "Answer to the question" not in text
    for grade_id, cell in original.items():
        meta, out = cell.metadata.nbgrader, stubbed[grade_id]
        if meta["solution"] and cell.cell_type == "code":
            assert "raise NotImplementedError()" in out.source, grade_id
            assert not any(line in out.source for line in solution_lines(cell.source) if len(line) > 20), grade_id
        elif meta["solution"]:
            assert out.source == "YOUR ANSWER HERE", grade_id
        else:  # a check: as in the chapter, and locked
            assert out.source == cell.source and out.metadata.editable is False, grade_id
    assert not any(INSTRUCTOR_TAG in c.metadata.get("tags", []) for c in student.cells)
    assert len(student.cells) == len(source.cells) - sum(INSTRUCTOR_TAG in c.metadata.get("tags", [])
                                                         for c in source.cells)
    assert not any(c.get("outputs") for c in student.cells)


@pytest.mark.autograde
def test_autograde_full_marks_for_the_chapter_and_zero_for_the_untouched_release():
    cheap = ["testing", "reliability"]
    scores = autograde(BOOK, only=cheap)
    assert sorted(scores) == sorted(cheap)
    for chapter, (instructor, untouched) in scores.items():
        nb = nbformat.read(next(p for p in CHAPTERS if p.stem == chapter), as_version=4)
        checks = [c.metadata.nbgrader for c in nb.cells
                  if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade")]
        assert instructor.auto_cells == untouched.auto_cells == len(checks) >= 2, chapter
        assert instructor.auto_max == sum(m["points"] for m in checks) > 0, chapter
        assert instructor.auto == instructor.auto_max, (chapter, instructor)
        assert untouched.auto == 0 and untouched.zero_cells == untouched.auto_cells, (chapter, untouched)
