"""Every chapter runs through papermill with a second parameter set, ``smoke``, from
``experiments/chapters/<stem>.yaml``: a robust or CIFAR-10 model on tiny sizes, so that a run with
parameters other than the defaults reports instead of crashing (the chapter runner, robustdl.runner).

The chapter's authors size the ``smoke`` set to seconds; the defaults are executed by nbval.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from robustdl.runner import SETS_DIR, load_sets, notebook_parameters, run_chapters

ROOT = Path(__file__).resolve().parents[1]


def book_stems() -> list[str]:
    """Every notebook under book/ (the chapters), whether or not it has its sets file yet."""
    return sorted(p.stem for p in (ROOT / "book").rglob("*.ipynb") if "_build" not in p.parts)


def test_the_book_has_its_fifteen_chapters() -> None:
    assert len(book_stems()) == 15, book_stems()


@pytest.mark.parametrize("stem", book_stems())
def test_chapter_has_a_smoke_set_of_its_own_parameters(stem: str) -> None:
    path = ROOT / SETS_DIR / f"{stem}.yaml"
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: the chapter's parameter sets (see robustdl.runner)"
    notebook, sets = load_sets(path)
    assert (ROOT / notebook).stem == stem and (ROOT / notebook).exists(), notebook
    assert "smoke" in sets, f"{path.relative_to(ROOT)} has no 'smoke' set (it has {sorted(sets)})"
    parameters = notebook_parameters(ROOT / notebook)
    for name, params in sets.items():
        unknown = sorted(set(params) - set(parameters))
        assert not unknown, f"{path.relative_to(ROOT)}: set {name!r} sets {unknown}, not in the parameters cell"


@pytest.mark.parametrize("stem", book_stems())
def test_chapter_runs_with_its_smoke_set(stem: str, tmp_path: Path) -> None:
    pytest.importorskip("papermill")
    if not (ROOT / SETS_DIR / f"{stem}.yaml").exists():
        pytest.fail(f"{SETS_DIR}/{stem}.yaml is missing, so the chapter has no smoke set to run")
    (record,) = run_chapters("smoke", tmp_path, root=ROOT, only=[stem])
    assert record["status"] == "passed", f"{stem} with its smoke set {record['parameters']}: {record['error']}"
    assert record["results"], f"{stem} saved no headline numbers"
