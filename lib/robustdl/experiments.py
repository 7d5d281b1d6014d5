"""Papermill sweeps: run a chapter notebook over a grid of parameters, collect its results.

Every chapter has a cell tagged ``parameters`` whose defaults run on a laptop CPU; a sweep
runs the same notebook at full scale by changing parameters only. A sweep is a YAML file::

    notebook: book/01-introduction/introduction.ipynb  # relative to the working directory
    output: experiments/runs/intro-eps                  # executed notebooks and the table
    parameters:                                         # optional: fixed for every point
      n_test: 500
    grid:                                               # cartesian product of these lists
      model_name: [mnist_smallcnn, mnist_mlp]
      eps: [0.1, 0.2]

``notebook`` and ``output`` are paths relative to the current working directory (run from
the repository root). Each point of the grid, the fixed ``parameters`` merged with one
combination of ``grid`` values, gets a stable id from its grid values
(``model_name=mnist_mlp,eps=0.1``; see :func:`point_id`) and is executed by papermill into
``output/ID.ipynb`` with one extra parameter, ``results_path`` (``output/ID.json``, absolute).
The kernel runs in the notebook's folder, as when a reader opens it. The notebook's last
cell reports its numbers::

    from robustdl.experiments import save_results
    save_results({"clean_acc": clean_acc, "robust_acc": robust_acc}, results_path)

which does nothing when ``results_path`` is empty (the default in the parameters cell),
so the notebook runs as usual outside a sweep.

Sweeps resume: a point whose results JSON exists is not run again (delete the JSON to
re-run it; change ``output`` when you change the fixed ``parameters``). A failing point is
reported and the others still run. At the end every finished point in ``output`` is
collected, its parameters (as papermill recorded them in the executed notebook) beside its
results, into ``output/results.csv`` and ``output/results.json``.

Run it from the command line (papermill is an extra: ``pip install robustdl[experiments]``)::

    python -m robustdl.experiments experiments/NAME.yaml [--dry-run] [--kernel python3] [--no-progress]

The same command runs the book's chapters with named parameter sets (``experiments/chapters/``) on
a chosen device, and the GPU check (:mod:`robustdl.runner`)::

    python -m robustdl.experiments chapters --set cifar10 --output experiments/runs/cifar10-chapters
    python -m robustdl.experiments gpu-check --output experiments/runs/gpu-check

The repository's address is pyproject.toml's ``[project.urls] Repository``, read from the installed
package's metadata by :func:`repository_url`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import io
import itertools
import json
import os
import re
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from robustdl._progress import progress_bar

__all__ = [
    "Grid",
    "SweepError",
    "collect",
    "committed_results",
    "load_grid",
    "point_id",
    "points",
    "raw_url",
    "repository_url",
    "run_grid",
    "save_results",
]

#: The branch whose committed files (results tables) chapters read; _config.yml's repository.branch.
BRANCH = "main"

#: The parameter through which a sweep tells the notebook where to write its results.
RESULTS_PARAMETER = "results_path"
#: Names of the table files that :func:`run_grid` writes into the output folder.
TABLE_CSV, TABLE_JSON = "results.csv", "results.json"

_KEYS = {"notebook", "output", "parameters", "grid"}
_REQUIRED = ("notebook", "output", "grid")
_ID_MAX_LEN = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


@dataclass(frozen=True)
class Grid:
    """A sweep: a notebook, an output folder, fixed parameters and lists of values to cross."""

    notebook: Path
    output: Path
    parameters: dict[str, Any]
    grid: dict[str, list[Any]]


class SweepError(RuntimeError):
    """Some points of a sweep failed; ``failures`` maps their ids to a summary of the error.

    Raised by :func:`run_grid` after the others ran and the table (``table``) was written.
    """

    def __init__(self, failures: dict[str, str], table: Path) -> None:
        self.failures = failures
        self.table = table
        lines = "\n".join(f"  {pid}: {summary}" for pid, summary in failures.items())
        super().__init__(f"{len(failures)} point(s) failed (table of the others: {table}):\n{lines}")


def load_grid(path: str | os.PathLike[str]) -> Grid:
    """Read and check a sweep YAML file (format in the module docstring)."""
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep must be a YAML mapping with keys {sorted(_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; a sweep has keys {sorted(_KEYS)}")
    for key in _REQUIRED:
        if key not in spec:
            raise ValueError(f"{path}: missing key {key!r}; a sweep needs {list(_REQUIRED)}")
    for key in ("notebook", "output"):
        if not isinstance(spec[key], str) or not spec[key]:
            raise ValueError(f"{path}: {key!r} must be a path relative to the working directory, got {spec[key]!r}")
    if not spec["notebook"].endswith(".ipynb"):
        raise ValueError(f"{path}: 'notebook' must be an .ipynb file, got {spec['notebook']!r}")
    parameters = _check_mapping(spec.get("parameters") or {}, "parameters", path)
    grid = _check_mapping(spec["grid"], "grid", path)
    if not grid:
        raise ValueError(f"{path}: 'grid' must map at least one parameter name to a list of values, got {grid!r}")
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid[{name!r}] must be a non-empty list of values, got {values!r}")
    both = sorted(set(parameters) & set(grid))
    if both:
        raise ValueError(f"{path}: {both} set in both 'parameters' and 'grid'; each name needs exactly one place")
    return Grid(Path(spec["notebook"]), Path(spec["output"]), parameters, grid)


def _check_mapping(value: object, key: str, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that ``value`` maps parameter names (identifiers, not reserved) to JSON values."""
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {key!r} must be a mapping from parameter names, got {value!r}")
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{path}: {key!r} has parameter name {name!r}; names must be Python identifiers")
        if name == RESULTS_PARAMETER:
            raise ValueError(f"{path}: {key!r} sets {name!r}, which the sweep reserves for the results file")
        try:
            json.dumps(item, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {key}[{name!r}] = {item!r} must be plain JSON data ({error})") from None
    return value


def points(grid: Grid) -> list[dict[str, Any]]:
    """Every point of the sweep: the fixed parameters merged with one combination of grid values.

    The last grid key varies fastest, as in :func:`itertools.product`.
    """
    names = list(grid.grid)
    return [
        {**grid.parameters, **dict(zip(names, combo, strict=True))} for combo in itertools.product(*grid.grid.values())
    ]


def point_id(params: Mapping[str, Any]) -> str:
    """A stable, file-name-safe id: ``name=value`` pairs joined by commas.

    Characters other than letters, digits and ``. _ = , + -`` become ``_``; when that
    changes the text, or it is longer than 80 characters, a short hash of the parameters
    is appended so that distinct points keep distinct ids.
    """
    raw = ",".join(f"{name}={value if isinstance(value, str) else json.dumps(value)}" for name, value in params.items())
    slug = _UNSAFE.sub("_", raw)
    if slug == raw and len(slug) <= _ID_MAX_LEN:
        return slug
    digest = hashlib.sha1(json.dumps(dict(params), sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug[:_ID_MAX_LEN]}-{digest}"


def _grid_ids(grid: Grid) -> list[tuple[str, dict[str, Any]]]:
    """(id, parameters) of every point; the id comes from the grid values alone."""
    pairs = [(point_id({name: params[name] for name in grid.grid}), params) for params in points(grid)]
    ids = [pid for pid, _ in pairs]
    if len(set(ids)) != len(ids):
        clashes = sorted({pid for pid in ids if ids.count(pid) > 1})
        raise ValueError(f"grid values give the same point id {clashes}; grid values need distinct text forms")
    return pairs


def run_grid(
    grid: Grid,
    *,
    kernel_name: str = "python3",
    progress: bool | None = None,
    execute: Callable[..., object] | None = None,
) -> Path:
    """Execute every point of ``grid`` not yet done, then write the table; return its CSV path.

    ``execute`` defaults to :func:`papermill.execute_notebook` (tests inject a counter).
    ``progress=None`` shows a bar unless ``$ROBUSTDL_PROGRESS`` is ``0``.
    Raises :class:`SweepError`, after the table is written, when any point failed.
    """
    if execute is None:
        execute = _papermill().execute_notebook
    if not grid.notebook.is_file():
        raise FileNotFoundError(f"grid.notebook: no notebook at {grid.notebook} (relative to {Path.cwd()})")
    output = grid.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    pairs = _grid_ids(grid)
    failures: dict[str, str] = {}
    for pid, params in progress_bar(pairs, progress, desc=grid.notebook.stem, unit="point"):
        results_path = output / f"{pid}.json"
        if results_path.exists():
            continue
        try:
            execute(
                str(grid.notebook),
                str(output / f"{pid}.ipynb"),
                parameters={**params, RESULTS_PARAMETER: str(results_path)},
                kernel_name=kernel_name,
                progress_bar=False,
                cwd=str(grid.notebook.resolve().parent),
            )
        except Exception as error:  # a failing point must not stop the sweep
            failures[pid] = _summary(error)
        if pid not in failures and not results_path.exists():
            failures[pid] = f"finished without writing {results_path.name}: call save_results(..., results_path)"
        if pid in failures:
            tqdm.write(f"failed {pid}: {failures[pid]}", file=sys.stderr)
    order = {pid: i for i, (pid, _) in enumerate(pairs)}
    rows = sorted(collect(output), key=lambda row: order.get(row["point"], len(order)))
    table = _write_table(rows, output)
    if failures:
        raise SweepError(failures, table)
    return table


def _papermill() -> Any:
    """Import papermill, or say how to install it."""
    try:
        import papermill
    except ImportError as error:
        raise ImportError("robustdl.experiments needs papermill: pip install robustdl[experiments]") from error
    return papermill


def _summary(error: Exception) -> str:
    """One line about ``error``; for a papermill failure, the notebook's exception."""
    if hasattr(error, "ename"):
        return f"{error.ename}: {error.evalue} (cell In [{error.exec_count}])"
    return f"{type(error).__name__}: {error}".splitlines()[0]


def collect(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per finished point in ``output_dir``: ``point`` (its id), parameters (in name
    order), results.

    A point is finished when its results ``ID.json`` exists; its parameters are those
    papermill recorded in ``ID.ipynb``. Rows are in file-name order.
    """
    rows = []
    for notebook in sorted(Path(output_dir).glob("*.ipynb")):
        results_path = notebook.parent / f"{notebook.stem}.json"
        if not results_path.exists():
            continue
        metadata = json.loads(notebook.read_text()).get("metadata", {})
        if "parameters" not in metadata.get("papermill", {}):
            raise ValueError(f"{notebook}: no metadata.papermill.parameters; it needs to be a papermill output")
        params = {k: v for k, v in metadata["papermill"]["parameters"].items() if k != RESULTS_PARAMETER}
        results = json.loads(results_path.read_text())
        clash = sorted(k for k in set(params) & set(results) if params[k] != results[k])
        if clash:
            raise ValueError(f"{results_path}: result key(s) {clash} differ from the parameters of the same name")
        rows.append({"point": notebook.stem, **params, **results})
    return rows


def repository_url() -> str:
    """The project's repository, ``https://github.com/OWNER/NAME``: pyproject.toml's
    ``[project.urls] Repository``, read from the installed package's metadata.

    It is set there only; the book's launch buttons (_config.yml) and every chapter's Colab
    install cell use the same address, which tests/test_book.py checks.
    """
    try:
        entries = importlib.metadata.metadata("robustdl").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError("robustdl is not installed, so its metadata has no repository: pip install -e .") from error
    urls = dict(entry.split(", ", 1) for entry in entries if ", " in entry)
    if "Repository" not in urls:
        raise RuntimeError(f"the installed robustdl's metadata names no Repository URL (it has {sorted(urls)}); "
                           "reinstall it from a pyproject.toml with [project.urls] Repository")
    return urls["Repository"].rstrip("/")


def raw_url(branch: str = BRANCH) -> str:
    """Where the repository's committed files are served raw: ``https://raw.githubusercontent.com/OWNER/NAME/BRANCH``."""
    prefix = "https://github.com/"
    url = repository_url()
    if not url.startswith(prefix):
        raise RuntimeError(f"raw_url: the repository {url!r} is not on GitHub (no raw.githubusercontent.com files)")
    return f"https://raw.githubusercontent.com/{url.removeprefix(prefix)}/{branch}"


def committed_results(output: str, base: str | None = None) -> list[dict[str, Any]]:
    """The results table a sweep committed, ``output/results.json`` (``output`` as in its YAML).

    A chapter runs in its own folder, so the table is looked for under the working directory and
    each of its parents; where none has it (a chapter opened on Colab, with only the library
    installed) it is read from the repository at ``base`` (default: :func:`raw_url`).
    """
    for folder in [Path.cwd(), *Path.cwd().parents]:
        path = folder / output / TABLE_JSON
        if path.exists():
            return json.loads(path.read_text())
    url = f"{base or raw_url()}/{output}/{TABLE_JSON}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())
    except OSError as error:
        raise FileNotFoundError(f"no {output}/{TABLE_JSON} under {Path.cwd()} or its parents, and {url} "
                                f"could not be read ({error}); run the sweep that writes it") from error


def _write_table(rows: Sequence[Mapping[str, Any]], output: Path) -> Path:
    """Write ``rows`` atomically as ``results.json`` and ``results.csv``; return the CSV path."""
    _write_atomic(output / TABLE_JSON, json.dumps(list(rows), indent=1) + "\n")
    columns = list(dict.fromkeys(["point", *(key for row in rows for key in row)]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    _write_atomic(output / TABLE_CSV, text.getvalue())
    return output / TABLE_CSV


def save_results(results: Mapping[str, Any], path: str | os.PathLike[str] | None) -> None:
    """Write a notebook's results as JSON to ``path``, atomically; do nothing if ``path`` is empty.

    Call it in a chapter's last cell with the ``results_path`` parameter. Numpy and torch
    scalars and arrays become Python numbers and lists; other values must be JSON data.
    """
    if not path:
        return
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a dict of named values, got {type(results).__name__}")
    plain = {_check_key(key): _plain(value, f"results[{key!r}]") for key, value in results.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(Path(path), json.dumps(plain, indent=1) + "\n")


def _check_key(key: object) -> str:
    """Check that a results key is a string (JSON object keys are)."""
    if not isinstance(key, str):
        raise TypeError(f"results keys must be strings, got {key!r} of type {type(key).__name__}")
    return key


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data; numpy/torch values via ``tolist()``; TypeError naming ``where``."""
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        value = value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {_check_key(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"{where} is a {type(value).__name__}, which JSON cannot hold; "
        "it needs to be a number, string, bool, None, list or dict (convert it first)"
    )


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run (or list, with ``--dry-run``) the sweep in a YAML file; or, with a first
    argument ``chapters`` or ``gpu-check``, the chapter runner of :mod:`robustdl.runner`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("chapters", "gpu-check"):
        from robustdl import runner  # it imports this module

        return (runner.main_chapters if argv[0] == "chapters" else runner.main_gpu_check)(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m robustdl.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("grid", help="the sweep's YAML file")
    parser.add_argument("--dry-run", action="store_true", help="list the points (done or to run) and stop")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        if args.dry_run:
            for pid, params in _grid_ids(grid):
                done = (grid.output / f"{pid}.json").exists()
                print(f"{'done' if done else 'todo'}  {pid}  {json.dumps(params)}")
            return 0
        table = run_grid(grid, kernel_name=args.kernel, progress=False if args.no_progress else None)
    except SweepError as error:
        print(error, file=sys.stderr)
        return 1
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.error(str(error))
    print(f"results: {table} and {table.with_name(TABLE_JSON)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
