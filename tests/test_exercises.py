"""forbid: a check runs the student's code with the library functions it re-implements refused."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

import robustdl
from robustdl.attacks import fgsm, gradient
from robustdl.exercises import ForbiddenCallError, forbid
from robustdl.threat import LpBall

BOOK = Path(__file__).resolve().parents[1] / "book"


def test_a_forbidden_function_refuses_under_every_name_and_comes_back():
    x = torch.rand(2, 1, 2, 2)
    main = sys.modules["__main__"]
    main.alias_of_fgsm = fgsm  # as a notebook's `from robustdl.attacks import fgsm` would
    try:
        with forbid("fgsm"):
            for call in (robustdl.attacks.fgsm, gradient.fgsm, main.alias_of_fgsm):
                with pytest.raises(ForbiddenCallError, match="do not call fgsm"):
                    call(None, x, None, 0.1)
        assert robustdl.attacks.fgsm is fgsm and gradient.fgsm is fgsm and main.alias_of_fgsm is fgsm
    finally:
        del main.alias_of_fgsm


def test_methods_and_other_modules_functions_can_be_forbidden():
    x = torch.rand(2, 1, 4, 4)
    project = LpBall.project
    with forbid("LpBall.project", "torch.nn.functional.grid_sample", "torch.cdist"):
        with pytest.raises(ForbiddenCallError):
            LpBall("linf", 0.1).project(x, x)
        with pytest.raises(ForbiddenCallError):
            F.grid_sample(x, torch.zeros(2, 4, 4, 2), align_corners=True)
        with pytest.raises(ForbiddenCallError):
            torch.cdist(x[0, 0], x[0, 0])
        assert torch.equal(x.clamp(0, 1), x)  # what is not named still works
    assert LpBall.project is project
    assert torch.equal(LpBall("linf", 0.1).project(x, x), x) and torch.cdist(x[0, 0], x[0, 0]).shape == (4, 4)


def test_forbid_restores_after_an_error_inside():
    with pytest.raises(ValueError, match="inside"), forbid("fgsm"):
        raise ValueError("inside")
    assert gradient.fgsm is fgsm


def test_unknown_names_and_non_functions_are_errors():
    with pytest.raises(ValueError, match="no loaded module"), forbid("no_such_function"):
        pass
    with pytest.raises(TypeError, match="not a function"), forbid("torch.float32"):
        pass


def forbidden_names(notebook: Path) -> list[str]:
    """The names every ``forbid(...)`` call of ``notebook``'s code cells refuses."""
    names = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code" and "forbid(" in cell.source:
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "forbid":
                    names += [arg.value for arg in node.args]
    return names


def test_every_name_the_chapters_forbid_exists():
    for module in pkgutil.walk_packages(robustdl.__path__, "robustdl."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    names = sorted({name for notebook in BOOK.rglob("*.ipynb") for name in forbidden_names(notebook)})
    assert len(names) > 20, names
    with forbid(*names):
        pass
