"""The book's structure: every chapter follows the conventions of DESIGN.md."""

from __future__ import annotations

import ast
import re
import shlex
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from robustdl.experiments import raw_url, repository_url

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: Distributions whose import name is not their name with "-" as "_" (lower case).
IMPORT_NAMES = {"scikit-learn": "sklearn", "pyyaml": "yaml", "pillow": "PIL", "ipython": "IPython",
                "adversarial-robustness-toolbox": "art", "opencv-python": "cv2", "beautifulsoup4": "bs4"}


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
    assert re.search(rf"robustdl(\[[\w,-]+\])? @ git\+{re.escape(repository_url())}[\"' ]", cells[0].source)
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


# One repository address: pyproject.toml's [project.urls], read from the installed metadata by the library.


def test_one_repository_address_everywhere():
    url = repository_url()
    assert url == PROJECT["urls"]["Repository"].rstrip("/")
    assert CONFIG["repository"]["url"].rstrip("/") == url  # the book's launch and repository buttons
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    owner, name = url.removeprefix("https://github.com/").split("/")
    assert raw_url() == f"https://raw.githubusercontent.com/{owner}/{name}/{CONFIG['repository']['branch']}"
    pages = f"https://{owner}.github.io/{name}"  # where .github/workflows/book.yml publishes the book
    assert PROJECT["urls"]["Homepage"].rstrip("/") == CONFIG["html"]["baseurl"].rstrip("/") == pages
    for path in CHAPTERS:
        installs = re.findall(r"git\+([^\s\"'@]+)", code_cells(path)[0].source)
        assert installs == [url], (path.stem, installs)


# A plain install runs every chapter: imports are the standard library, robustdl, the core dependencies,
# or what the chapter's first (Colab) cell installs.


def distribution(requirement: str) -> tuple[str, list[str]]:
    """The distribution name (lower case) and extras of a requirement such as ``robustdl[colab] @ git+...``."""
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match[1].lower(), [e.strip() for e in (match[2] or "").split(",") if e.strip()]


def import_name(dist: str) -> str:
    return IMPORT_NAMES.get(dist, dist.replace("-", "_").replace(".", "_"))


def strip_magics(source: str) -> str:
    """Cell source as Python: IPython magics and shell escapes (``%pip``, ``!ls``) become ``pass``."""
    lines = source.splitlines()
    return "\n".join(re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in lines)


def imported_modules(source: str) -> set[str]:
    """Top-level names of the modules a cell imports, at any depth (inside ifs, functions...)."""
    modules = set()
    for node in ast.walk(ast.parse(strip_magics(source))):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def first_cell_installs(source: str, project: dict) -> set[str]:
    """Import names of what ``%pip install`` lines install: distributions, and robustdl's requested extras."""
    names: set[str] = set()
    for line in source.splitlines():
        words = shlex.split(line.strip()) if re.match(r"\s*[%!]\s*pip3? install", line) else []
        for word in words[2:]:
            if word.startswith(("-", "git+", "http", "@")):
                continue
            dist, extras = distribution(word)
            names.add(import_name(dist))
            if dist == project["name"]:
                optional = project.get("optional-dependencies", {})
                names |= {import_name(distribution(req)[0]) for extra in extras for req in optional.get(extra, [])}
    return names


def allowed_modules(first_cell: str, project: dict = PROJECT) -> set[str]:
    core = {import_name(distribution(req)[0]) for req in project["dependencies"]}
    return set(sys.stdlib_module_names) | {"robustdl"} | core | first_cell_installs(first_cell, project)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_imports_only_core_dependencies(path):
    cells = code_cells(path)
    allowed = allowed_modules(cells[0].source)
    extra = sorted({(module, index) for index, cell in enumerate(cells)
                    for module in imported_modules(cell.source) - allowed})
    assert not extra, (
        f"{path.relative_to(ROOT)} imports {[m for m, _ in extra]} (code cells {[i for _, i in extra]}): neither the "
        "standard library, robustdl, a core dependency of pyproject.toml [project] dependencies, nor installed by "
        "the chapter's first cell; a plain `pip install robustdl` (Colab) stops there with ModuleNotFoundError"
    )


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_library_names(source: str) -> set[str]:
    """Private names (``_x``, not dunders) of robustdl that a cell imports, or reads as attributes of its modules."""
    tree = ast.parse(strip_magics(source))
    found, bound = set(), set()  # bound: the names that refer to robustdl or something imported from it
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "robustdl":
            found |= {node.module for part in node.module.split(".") if _private(part)}
            found |= {f"{node.module}.{alias.name}" for alias in node.names if _private(alias.name)}
            bound |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "robustdl":
                    found |= {alias.name for part in alias.name.split(".") if _private(part)}
                    bound.add(alias.asname or "robustdl")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.add(f"{root.id}...{node.attr}")
    return found


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapters_use_no_private_name_of_the_library(path):
    """What a chapter teaches is public: documented, in an ``__all__``, and kept stable for readers."""
    used = sorted({(name, index) for index, cell in enumerate(code_cells(path))
                   for name in private_library_names(cell.source)})
    assert not used, (
        f"{path.relative_to(ROOT)} uses private names of robustdl {[n for n, _ in used]} (code cells "
        f"{[i for _, i in used]}): make the name public (a docstring citing its paper, an __all__ entry) or use "
        "a public function"
    )


def test_private_name_check_finds_imports_and_attributes():
    source = (
        "import robustdl.verify as V\nfrom robustdl.verify.deepgo import _search_1d, minimise\n"
        "from robustdl import _random\nfrom robustdl.verify import milp\nimport numpy as np\n"
        "milp._Program.relu_layer\nV.deepgo._Level\nminimise.__doc__\nnp._NoValue\n"
    )
    assert private_library_names(source) == {
        "robustdl.verify.deepgo._search_1d", "robustdl._random", "milp..._Program", "V..._Level"}
    assert not private_library_names("from robustdl.verify.milp import Program\nshow_source(Program.relu_layer)")


def test_import_check_finds_nested_imports_and_reads_install_cells():
    source = (
        "import sys, os.path\nfrom torch import nn\nfrom . import local\n"
        "if True:\n    %pip install -q x\n    def f():\n        import art.estimators\n"
        "!echo hi\ntry:\n    from pandas import DataFrame\nexcept ImportError:\n    pass\n"
    )
    assert imported_modules(source) == {"sys", "os", "torch", "art", "pandas"}
    project = {"name": "robustdl", "dependencies": ["torch>=2", "scikit-learn", "PyYAML>=6"],
               "optional-dependencies": {"colab": ["adversarial-robustness-toolbox>=1.17", "pandas"]}}
    first = 'if "google.colab" in sys.modules:\n    %pip install --quiet "robustdl[colab] @ git+https://x.org/a/b" tqdm'
    assert first_cell_installs(first, project) == {"robustdl", "art", "pandas", "tqdm"}
    assert {"sklearn", "yaml", "torch", "json"} <= allowed_modules("", project)
    assert not {"art", "pandas", "sklearn_extra"} & allowed_modules("", project)


def test_workflow_tests_every_push_and_publishes_the_book_from_main():
    workflow = yaml.safe_load((ROOT / ".github/workflows/book.yml").read_text())
    triggers, jobs = workflow[True], workflow["jobs"]  # YAML 1.1 reads the key `on` as True
    assert triggers["push"]["branches"] == [CONFIG["repository"]["branch"]] and "pull_request" in triggers

    def runs(job: str) -> str:
        return " ".join(step.get("run", "") + step.get("uses", "") for step in jobs[job]["steps"])

    assert "make test" in runs("test") and "make book" in runs("build") and jobs["build"]["needs"] == "test"
    (upload,) = [s for s in jobs["build"]["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact")]
    assert upload["with"]["path"] == "_build/html"
    assert "actions/deploy-pages" in runs("deploy") and jobs["deploy"]["environment"]["name"] == "github-pages"
    assert jobs["deploy"]["permissions"] == {"pages": "write", "id-token": "write"}
