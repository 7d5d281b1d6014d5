"""Checks of the chapters' exercises that test the student's own work.

An exercise that asks for a re-implementation of a library function must not be passed by
calling that function. A check cell therefore runs the student's code inside :func:`forbid`::

    expected = fgsm(model, x, y, eps=0.1)          # the library's answer, computed first
    with forbid("fgsm", "input_gradient"):
        mine = my_fgsm(model, x, y, 0.1)           # fails if my_fgsm calls them
    assert torch.allclose(mine, expected)

While the block runs, every reference to a forbidden function, in every loaded module (the
library's, torch's and the notebook's own namespace, ``__main__``), is replaced by a stand-in
that raises :class:`ForbiddenCallError`; all are restored afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["ForbiddenCallError", "forbid"]

_MISSING = object()


class ForbiddenCallError(RuntimeError):
    """A check's code called a function its exercise asks the student to write themselves."""


def _library_modules() -> list[ModuleType]:
    """The loaded modules of the robustdl package."""
    return [m for name, m in list(sys.modules.items())
            if isinstance(m, ModuleType) and (name == "robustdl" or name.startswith("robustdl."))]


def _owners(name: str) -> list[tuple[object, str]]:
    """The (owner, attribute) pairs that ``name`` denotes.

    ``"fgsm"`` is the attribute ``fgsm`` of every loaded robustdl module that has one;
    ``"LpBall.project"`` an attribute of such an attribute (a method of a library class);
    ``"torch.nn.functional.grid_sample"`` a dotted path from a loaded top-level module.
    """
    head, *path = name.split(".")
    if not path:
        pairs = [(m, head) for m in _library_modules() if head in vars(m)]
    else:
        roots = [sys.modules[head]] if head in sys.modules else _library_attributes(head)
        pairs = []
        for root in roots:
            owner = root
            for part in path[:-1]:
                owner = getattr(owner, part)
            pairs.append((owner, path[-1]))
    if not pairs:
        raise ValueError(f"forbid: no loaded module defines {name!r}")
    if not all(callable(getattr(owner, attr)) for owner, attr in pairs):
        raise TypeError(f"forbid: {name!r} is not a function")
    return pairs


def _library_attributes(name: str) -> list[object]:
    """The distinct objects called ``name`` in the loaded robustdl modules."""
    found = {id(v): v for m in _library_modules() if (v := vars(m).get(name, _MISSING)) is not _MISSING}
    return list(found.values())


def _stand_in(name: str) -> Callable[..., object]:
    """A function that refuses to run, naming the exercise's forbidden ``name``."""

    def refuse(*_args: object, **_kwargs: object) -> object:
        raise ForbiddenCallError(f"this exercise asks you to implement this yourself: do not call {name}")

    return refuse


def _aliases(originals: dict[int, str]) -> list[tuple[ModuleType, str]]:
    """Every module attribute, in every loaded module, that is one of the objects ``originals`` names."""
    found = []
    for module in list(sys.modules.values()):
        if isinstance(module, ModuleType):
            found += [(module, attr) for attr, value in list(vars(module).items()) if id(value) in originals]
    return found


@contextmanager
def forbid(*names: str) -> Iterator[None]:
    """Within the block, calling any of the functions ``names`` raises :class:`ForbiddenCallError`.

    Args:
        names: library names (``"fgsm"``, a class's method ``"LpBall.project"``) or dotted
            paths from a loaded top-level module (``"torch.cdist"``).
    """
    sites = [(owner, attr, name) for name in names for owner, attr in _owners(name)]
    originals = {id(getattr(owner, attr)): name for owner, attr, name in sites}
    sites += [(owner, attr, originals[id(getattr(owner, attr))]) for owner, attr in _aliases(originals)]
    saved = {(id(owner), attr): (owner, attr, vars(owner).get(attr, _MISSING)) for owner, attr, _ in sites}
    try:
        for owner, attr, name in sites:
            setattr(owner, attr, _stand_in(name))
        yield
    finally:
        for owner, attr, original in saved.values():
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
