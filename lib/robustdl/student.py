"""Make the student version of the chapters: solutions removed, outputs cleared.

``python -m robustdl.student book student`` (or ``make student``) copies every notebook under
``book/`` to ``student/``, replacing each block between ``### BEGIN SOLUTION`` and
``### END SOLUTION`` (nbgrader's markers) with a stub, and clearing all outputs so that no
result of a solution shows. Markdown answers become "YOUR ANSWER HERE". The auto-check cells
stay, so a student runs them to check their work. The markers are nbgrader's, so instructors
who use nbgrader can run ``nbgrader generate_assignment`` on the same notebooks instead.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nbformat

__all__ = ["make_student_version", "strip_solutions"]

_BLOCK = re.compile(r"^([ \t]*)### BEGIN SOLUTION[^\n]*\n.*?^[ \t]*### END SOLUTION[^\n]*(\n|$)", re.M | re.S)
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()\n"
MARKDOWN_STUB = "YOUR ANSWER HERE\n"


def strip_solutions(source: str, cell_type: str = "code") -> str:
    """``source`` with every solution block replaced by a stub, indented like its markers."""
    if source.count("### BEGIN SOLUTION") != source.count("### END SOLUTION"):
        raise ValueError("source has unbalanced ### BEGIN SOLUTION / ### END SOLUTION markers")
    stub = CODE_STUB if cell_type == "code" else MARKDOWN_STUB

    def replace(match: re.Match[str]) -> str:
        indent = match.group(1)
        return "".join(indent + line for line in stub.splitlines(keepends=True))

    return _BLOCK.sub(replace, source)


def make_student_version(source: Path, target: Path) -> int:
    """Write the student version of notebook ``source`` to ``target``; return the blocks removed."""
    nb = nbformat.read(source, as_version=4)
    removed = 0
    for cell in nb.cells:
        removed += cell.source.count("### BEGIN SOLUTION")
        cell.source = strip_solutions(cell.source, cell.cell_type)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return removed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m robustdl.student", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder of chapter notebooks (e.g. book)")
    parser.add_argument("target", type=Path, help="folder for the student versions (e.g. student)")
    args = parser.parse_args(argv)
    notebooks = sorted(p for p in args.source.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    for path in notebooks:
        removed = make_student_version(path, args.target / path.relative_to(args.source))
        print(f"{path}: {removed} solution block(s) removed")


if __name__ == "__main__":
    main()
