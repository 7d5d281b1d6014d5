"""The shape of the library: every import runs down the house, never up or sideways.

The rooms stand on floors (lowest first). A module may import rooms on its own floor or below;
``attacks`` and ``verify`` stand side by side and never import each other; ``train`` stands on
both (adversarial training uses attacks, certified training uses bounds). Imports inside
functions count too: a lazy import that runs upward is still an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import robustdl

PACKAGE = Path(robustdl.__file__).parent

FLOORS: list[set[str]] = [
    {"_checks", "_random", "_progress", "display", "student", "exercises"},
    {"models", "data"},
    {"threat", "_model", "losses", "layers", "ascent"},
    {"attacks", "verify"},
    {"train"},
    {"measures", "evaluation", "reliability"},
    {"zoo"},
    {"plot", "experiments", "runner", "__init__", "__main__"},
]
LEVEL = {room: floor for floor, rooms in enumerate(FLOORS) for room in rooms}
SIDE_BY_SIDE = {("attacks", "verify"), ("verify", "attacks")}
#: The two command-line rooms call each other on purpose (the runner is experiments' subcommand).
ALLOWED = {("runner", "experiments"), ("experiments", "runner")}


def room(module: str) -> str:
    """The room of ``robustdl.x.y`` is ``x``; the package itself is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_of(path: Path) -> str:
    parts = ["robustdl", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every robustdl module that ``path`` imports, at module level or inside a function."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("robustdl")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if name == "robustdl":  # `from robustdl import zoo` imports the room robustdl.zoo
                found |= {f"robustdl.{a.name}" for a in node.names}
            elif name.startswith("robustdl"):
                found.add(name)
    return found


def arrows() -> list[tuple[str, str]]:
    return [(module_of(p), target) for p in sorted(PACKAGE.rglob("*.py")) for target in imported(p)]


def test_every_room_has_a_floor() -> None:
    rooms = {room(module_of(p)) for p in PACKAGE.rglob("*.py")}
    assert rooms <= set(LEVEL), f"rooms without a floor in this test: {sorted(rooms - set(LEVEL))}"


@pytest.mark.parametrize(("source", "target"), arrows(), ids=lambda m: m)
def test_no_import_runs_up_or_sideways(source: str, target: str) -> None:
    a, b = room(source), room(target)
    if a == b or (a, b) in ALLOWED:
        return
    assert (a, b) not in SIDE_BY_SIDE, f"{source} imports {target}: attacks and verify stand side by side"
    assert LEVEL[b] <= LEVEL[a], f"{source} (floor {LEVEL[a]}) imports {target} (floor {LEVEL[b]}): upward"

