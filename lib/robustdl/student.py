"""The students' version of the chapters, and their grading, by nbgrader.

Every chapter's exercises are nbgrader cells: solution cells (``### BEGIN SOLUTION`` /
``### END SOLUTION``), locked auto-graded check cells with points, and manually graded
written answers. Each chapter is one nbgrader assignment of one notebook, in a temporary
course directory (``source/<chapter>/<chapter>.ipynb``, ``release/``,
``submitted/<student>/<chapter>/``, ``autograded/``, and the gradebook ``gradebook.db``).

``python -m robustdl.student release book student`` (``make student``) runs nbgrader's
``generate_assignment`` on every chapter and writes each release notebook to
``student/<part>/<chapter>.ipynb``: solutions replaced by stubs, outputs cleared, check cells
locked, and the instructors' cells (tag ``remove-cell``: the chapter's claim checks) removed.

``python -m robustdl.student autograde book`` (``make autograde``) autogrades, for every
chapter, the instructor's version (the chapter itself: it must score full marks) and the
untouched release (it must score zero on every auto-graded cell), and prints a table.
Executing a chapter takes as long as the chapter does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nbconvert.preprocessors import TagRemovePreprocessor
from nbgrader.api import Gradebook
from nbgrader.apps import NbGraderAPI
from nbgrader.converters import Autograde, GenerateAssignment
from nbgrader.coursedir import CourseDirectory
from traitlets import Bool, Set, Unicode
from traitlets.config import Config

__all__ = ["INSTRUCTOR_TAG", "Course", "RemoveInstructorCells", "Score", "chapters", "main"]

#: The tag of the cells that only instructors see (hidden in the book, absent from the release).
INSTRUCTOR_TAG = "remove-cell"
#: The students whose submissions ``autograde`` grades: the chapter itself and the untouched release.
INSTRUCTOR, UNTOUCHED = "instructor", "untouched"


class RemoveInstructorCells(TagRemovePreprocessor):
    """nbconvert's tag remover, switched on, dropping the cells tagged ``remove-cell``."""

    enabled = Bool(True).tag(config=True)
    remove_cell_tags = Set(Unicode(), default_value={INSTRUCTOR_TAG}).tag(config=True)


@dataclass(frozen=True)
class Score:
    """One submission's auto-graded points: scored and possible, and its written answers' points."""

    auto: float
    auto_max: float
    auto_cells: int
    zero_cells: int
    written_max: float


def chapters(book: Path) -> list[Path]:
    """The chapter notebooks under ``book``, sorted by path."""
    return sorted(p for p in book.rglob("*.ipynb") if not {".ipynb_checkpoints", "_build"} & set(p.parts))


def course_config(root: Path, timeout: int) -> Config:
    """nbgrader's configuration: the course in ``root``, instructors' cells removed first, ``timeout`` s a cell.

    The cells tagged ``remove-cell`` leave before nbgrader's own preprocessors see the notebook,
    both when the release is generated and when a submission is sanitised for autograding.
    """
    config = Config()
    config.CourseDirectory.root = str(root)
    first = [RemoveInstructorCells]
    config.GenerateAssignment.preprocessors = first + GenerateAssignment.class_traits()["preprocessors"].default()
    config.Autograde.sanitize_preprocessors = first + Autograde.class_traits()["sanitize_preprocessors"].default()
    config.Execute.timeout = timeout
    return config


def put_scripts_on_path() -> None:
    """Put this interpreter's scripts folder first on ``PATH``: nbgrader runs ``alembic`` from there.

    A new gradebook is stamped by the ``alembic`` command, which lies beside the interpreter of a
    virtual environment that ``make`` runs without activating it.
    """
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])


class Course:
    """A temporary nbgrader course of the chapters: one assignment (and notebook) per chapter."""

    def __init__(self, root: Path, timeout: int = 1800) -> None:
        put_scripts_on_path()
        self.root = root
        config = course_config(root, timeout)
        self.api = NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)

    def _path(self, folder: str, chapter: str, student: str | None = None) -> Path:
        """The notebook of ``chapter`` in one of the course's folders (per student for submissions)."""
        return self.root.joinpath(folder, *([student] if student else []), chapter, f"{chapter}.ipynb")

    def _run(self, result: dict[str, object], what: str) -> None:
        """Raise with nbgrader's log when ``result`` (an NbGraderAPI answer) is a failure."""
        if not result["success"]:
            raise RuntimeError(f"nbgrader {what} failed:\n{result.get('log', '')}\n{result.get('error', '')}")

    def release(self, notebook: Path) -> Path:
        """Add ``notebook`` as an assignment, generate its release, and return the release notebook."""
        chapter = notebook.stem
        source = self._path("source", chapter)
        source.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(notebook, source)
        self._run(self.api.generate_assignment(chapter), f"generate_assignment {chapter}")
        return self._path("release", chapter)

    def autograde(self, chapter: str, student: str, submission: Path) -> Score:
        """Submit ``submission`` as ``student``'s ``chapter``, autograde it and return its score."""
        submitted = self._path("submitted", chapter, student)
        submitted.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(submission, submitted)
        self._run(self.api.autograde(chapter, student), f"autograde {chapter} for {student}")
        return self.score(chapter, student)

    def score(self, chapter: str, student: str) -> Score:
        """``student``'s auto-graded points in ``chapter``, read from the gradebook."""
        with Gradebook(self.api.coursedir.db_url) as gradebook:
            grades = gradebook.find_submission_notebook(chapter, chapter, student).grades
            code = [g for g in grades if g.cell_type == "code"]
            return Score(auto=sum(g.auto_score or 0.0 for g in code), auto_max=sum(g.max_score for g in code),
                         auto_cells=len(code), zero_cells=sum(not g.auto_score for g in code),
                         written_max=sum(g.max_score for g in grades if g.cell_type == "markdown"))


def release(book: Path, target: Path) -> list[Path]:
    """Write the release of every chapter under ``book`` to ``target/<part>/<chapter>.ipynb``."""
    written = []
    with tempfile.TemporaryDirectory(prefix="robustdl-course-") as root:
        course = Course(Path(root))
        for notebook in chapters(book):
            out = target / notebook.relative_to(book)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(course.release(notebook), out)
            written.append(out)
    return written


def autograde(book: Path, only: list[str] | None = None, timeout: int = 1800) -> dict[str, tuple[Score, Score]]:
    """Autograde every chapter (or those in ``only``): the scores of the chapter and of its untouched release."""
    scores = {}
    with tempfile.TemporaryDirectory(prefix="robustdl-course-") as root:
        course = Course(Path(root), timeout)
        for notebook in chapters(book):
            if only and notebook.stem not in only:
                continue
            released = course.release(notebook)
            scores[notebook.stem] = (course.autograde(notebook.stem, INSTRUCTOR, notebook),
                                     course.autograde(notebook.stem, UNTOUCHED, released))
    return scores


def passed(instructor: Score, untouched: Score) -> bool:
    """Whether the chapter scores full marks and its untouched release zero, with checks to score."""
    return instructor.auto == instructor.auto_max > 0 and untouched.zero_cells == untouched.auto_cells > 0


def table(scores: dict[str, tuple[Score, Score]]) -> str:
    """A table of each chapter's auto-graded points, instructor and untouched, and its written points."""
    lines = [f"{'chapter':28s} {'instructor':>11s} {'untouched':>11s} {'checks':>6s} {'written':>7s}  verdict"]
    for chapter, (instructor, untouched) in scores.items():
        lines.append(f"{chapter:28s} {f'{instructor.auto:g}/{instructor.auto_max:g}':>11s} "
                     f"{f'{untouched.auto:g}/{untouched.auto_max:g}':>11s} {instructor.auto_cells:6d} "
                     f"{instructor.written_max:7g}  {'ok' if passed(instructor, untouched) else 'WRONG'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line: ``release BOOK TARGET`` or ``autograde BOOK [--only CHAPTER ...]``."""
    parser = argparse.ArgumentParser(prog="python -m robustdl.student", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("release", help="write the students' version of every chapter")
    make.add_argument("book", type=Path, help="folder of chapter notebooks (e.g. book)")
    make.add_argument("target", type=Path, help="folder for the students' versions (e.g. student)")
    grade = commands.add_parser("autograde", help="autograde the instructor's and the untouched versions")
    grade.add_argument("book", type=Path, help="folder of chapter notebooks (e.g. book)")
    grade.add_argument("--only", nargs="+", help="chapter names (notebook stems), e.g. testing reliability")
    grade.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run (default 1800)")
    args = parser.parse_args(argv)
    if args.command == "release":
        for path in release(args.book, args.target):
            print(path)
        return 0
    scores = autograde(args.book, args.only, args.timeout)
    print(table(scores))
    return 0 if all(passed(*pair) for pair in scores.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
