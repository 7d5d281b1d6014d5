"""The student version: solutions replaced by stubs, outputs cleared, checks kept."""

from __future__ import annotations

import nbformat
import pytest

from robustdl.student import CODE_STUB, make_student_version, strip_solutions


def test_strip_solutions_keeps_the_surrounding_code_and_indent():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\nprint(f)\n"
    assert strip_solutions(source) == (
        "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(f)\n")


def test_markdown_answers_become_placeholders():
    assert strip_solutions("Q?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION\n", "markdown") == (
        "Q?\nYOUR ANSWER HERE\n")


def test_unbalanced_markers_are_an_error():
    with pytest.raises(ValueError, match="unbalanced"):
        strip_solutions("### BEGIN SOLUTION\nx = 1\n")


def test_make_student_version(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION\n", execution_count=1,
                                  outputs=[nbformat.v4.new_output("stream", text="42\n")]),
        nbformat.v4.new_code_cell("assert answer == 42"),
    ]
    nbformat.write(nb, tmp_path / "chapter.ipynb")
    removed = make_student_version(tmp_path / "chapter.ipynb", tmp_path / "student" / "chapter.ipynb")
    student = nbformat.read(tmp_path / "student" / "chapter.ipynb", as_version=4)
    assert removed == 1
    assert student.cells[0].source == CODE_STUB and student.cells[0].outputs == []
    assert student.cells[0].execution_count is None
    assert student.cells[1].source == "assert answer == 42"
