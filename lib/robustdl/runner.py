"""The chapter runner: execute the book's chapters with a named parameter set, on a chosen device.

Each chapter may have a file ``experiments/chapters/<notebook-stem>.yaml`` of named parameter sets::

    notebook: book/02-attacks/white-box.ipynb   # relative to the repository root
    sets:
      cifar10:                                  # the chapter on CIFAR-10 with its bundled models
        model_name: cifar10_convlarge
        eps: 0.03137254901960784
      smoke:                                    # tiny sizes: tests/test_chapters.py runs this one
        model_name: cifar10_convlarge
        n_test: 8

The set ``defaults`` needs no file: it runs the notebook's own parameters cell. For every chapter
:func:`run_chapters` runs papermill (kernel in the notebook's folder, ``results_path`` injected),
with ``$ROBUSTDL_DEVICE`` set so that ``robustdl.device()`` in the chapter picks the device asked
for, and writes into the output folder::

    <stem>.ipynb                 the executed notebook (git-ignored)
    <stem>.json                  its record: status (passed, failed, skipped), seconds, the error's
                                 summary, the parameters, and the headline numbers it saved
    results.json results.csv results.md   one row per record in the folder, in the book's order

A chapter whose YAML has no such set is skipped (the method may not apply to that data). From the
command line (papermill is an extra: ``pip install robustdl[experiments]``)::

    python -m robustdl.experiments chapters --set cifar10 --output experiments/runs/cifar10-chapters \\
        [--device cuda] [--only white-box ...] [--jobs 4]
    python -m robustdl.experiments gpu-check --output experiments/runs/gpu-check

``gpu-check`` runs ``pytest -m gpu`` and every chapter with the sets ``defaults`` and ``cifar10`` on
the GPU, and writes ``report.md`` (see :func:`gpu_check`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustdl.experiments import RESULTS_PARAMETER, _check_mapping, _papermill, _summary, _write_atomic

__all__ = ["DEFAULTS", "Chapter", "find_chapters", "gpu_check", "notebook_parameters", "run_chapters", "write_tables"]

#: The set name that runs a notebook with its own parameters cell.
DEFAULTS = "defaults"
#: Where the chapters' parameter sets live, relative to the repository root.
SETS_DIR = Path("experiments/chapters")
#: The sets that ``make gpu-check`` runs.
GPU_SETS = (DEFAULTS, "cifar10")
_TABLES = {"results.json", "results.csv", "results.md"}
_SUMMARY_LINE = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b")


@dataclass(frozen=True)
class Chapter:
    """A chapter of the book: its notebook (relative to the root) and its named parameter sets."""

    stem: str
    notebook: Path
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def parameters(self, set_name: str) -> dict[str, Any] | None:
        """The parameters of ``set_name`` (``{}`` for ``defaults``), or None when it has no such set."""
        return {} if set_name == DEFAULTS else self.sets.get(set_name)


def _book_notebooks(root: Path) -> list[Path]:
    """The chapters' notebooks relative to ``root``, in the order of _toc.yml (then any others, sorted)."""
    found = sorted(p.relative_to(root) for p in (root / "book").rglob("*.ipynb")
                   if "_build" not in p.parts and ".ipynb_checkpoints" not in p.parts)
    toc_path = root / "_toc.yml"
    order: list[str] = []
    if toc_path.exists():
        toc = yaml.safe_load(toc_path.read_text()) or {}
        order = [toc.get("root", "")] + [c["file"] for part in toc.get("parts", []) for c in part.get("chapters", [])]
    rank = {f"{name}.ipynb": i for i, name in enumerate(order)}
    return sorted(found, key=lambda p: (rank.get(p.as_posix(), len(rank)), p.as_posix()))


def load_sets(path: str | os.PathLike[str]) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Read and check a chapter's parameter sets (format in the module docstring): (notebook, sets)."""
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or set(spec) - {"notebook", "sets"} or "sets" not in spec:
        raise ValueError(f"{path}: a chapter's sets file is a mapping with keys 'notebook' and 'sets', got {spec!r}")
    notebook = spec.get("notebook")
    if not isinstance(notebook, str) or not notebook.endswith(".ipynb"):
        raise ValueError(f"{path}: 'notebook' must be the chapter's .ipynb relative to the root, got {notebook!r}")
    if not isinstance(spec["sets"], dict) or not spec["sets"]:
        raise ValueError(f"{path}: 'sets' must map set names to parameters, got {spec['sets']!r}")
    if DEFAULTS in spec["sets"]:
        raise ValueError(f"{path}: the set name {DEFAULTS!r} is reserved for the notebook's own parameters")
    sets = {str(name): _check_mapping(params or {}, f"sets.{name}", path) for name, params in spec["sets"].items()}
    return Path(notebook), sets


def find_chapters(root: str | os.PathLike[str] = ".") -> list[Chapter]:
    """Every notebook under ``root/book``, in the book's order, with its sets from ``experiments/chapters``.

    Raises ValueError when a sets file names a notebook other than the chapter of its stem.
    """
    root = Path(root)
    chapters = []
    for notebook in _book_notebooks(root):
        sets_path = root / SETS_DIR / f"{notebook.stem}.yaml"
        sets: dict[str, dict[str, Any]] = {}
        if sets_path.exists():
            named, sets = load_sets(sets_path)
            if named != notebook:
                raise ValueError(f"{sets_path}: 'notebook' is {named}, but the chapter {notebook.stem!r} is {notebook}")
        chapters.append(Chapter(notebook.stem, notebook, sets))
    return chapters


def notebook_parameters(path: str | os.PathLike[str]) -> dict[str, str]:
    """The names a notebook's ``parameters`` cell assigns, with the source text of each default value."""
    notebook = json.loads(Path(path).read_text())
    cells = [c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: needs exactly one cell tagged 'parameters', found {len(cells)}")
    source = "".join(cells[0]["source"])
    names = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
                names[target.id] = ast.get_source_segment(source, node.value) or ""
    return names


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, leave alone) environment variables, restoring them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_chapter(
    chapter: Chapter,
    set_name: str,
    output: Path,
    *,
    root: Path,
    device: str | None = None,
    kernel_name: str = "python3",
    timeout: float | None = None,
    execute: Callable[..., object] | None = None,
) -> dict[str, Any]:
    """Execute one chapter with one set into ``output``; write and return its record (never raises
    for a failing chapter: the failure is the record's ``status`` and ``error``)."""
    record_path, executed = output / f"{chapter.stem}.json", output / f"{chapter.stem}.ipynb"
    for stale in (record_path, executed):
        stale.unlink(missing_ok=True)
    params = chapter.parameters(set_name)
    record: dict[str, Any] = {"chapter": chapter.stem, "notebook": chapter.notebook.as_posix(), "set": set_name,
                              "device": device or "auto", "status": "skipped", "seconds": 0.0, "error": "",
                              "parameters": params or {}, "results": {}}
    if params is None:
        record["error"] = f"no set {set_name!r} in {SETS_DIR / (chapter.stem + '.yaml')}"
    else:
        record.update(_execute(chapter, params, record_path, executed, root=root, kernel_name=kernel_name,
                               timeout=timeout, execute=execute))
    _write_atomic(record_path, json.dumps(record, indent=1) + "\n")
    return record


def _execute(chapter: Chapter, params: Mapping[str, Any], results_path: Path, executed: Path, *, root: Path,
             kernel_name: str, timeout: float | None, execute: Callable[..., object] | None) -> dict[str, Any]:
    """Run papermill on the chapter; return status, seconds, error and results."""
    notebook = (root / chapter.notebook).resolve()
    unknown = sorted(set(params) - set(notebook_parameters(notebook)))
    if unknown:
        return {"status": "failed", "error": f"parameter(s) {unknown} are not in the notebook's parameters cell"}
    run = execute or _papermill().execute_notebook
    start = time.perf_counter()
    try:
        run(str(notebook), str(executed), parameters={**params, RESULTS_PARAMETER: str(results_path)},
            kernel_name=kernel_name, progress_bar=False, cwd=str(notebook.parent), execution_timeout=timeout)
        error = "" if results_path.exists() else "finished without results: call save_results(..., results_path)"
    except Exception as exc:  # a failing chapter is reported and the others still run
        error = _summary(exc)
    seconds = round(time.perf_counter() - start, 1)
    results = json.loads(results_path.read_text()) if results_path.exists() and not error else {}
    return {"status": "failed" if error else "passed", "seconds": seconds, "error": error, "results": results}


def run_chapters(
    set_name: str,
    output: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] = ".",
    only: Sequence[str] | None = None,
    device: str | None = None,
    kernel_name: str = "python3",
    jobs: int = 1,
    timeout: float | None = None,
    execute: Callable[..., object] | None = None,
) -> list[dict[str, Any]]:
    """Run every chapter (or the stems in ``only``) with ``set_name``; write the tables; return the records.

    ``device`` (e.g. ``"cuda"``) is passed to the chapters as ``$ROBUSTDL_DEVICE``. ``jobs`` chapters
    run at once, each kernel with its share of the CPU threads. ``timeout`` bounds each cell, in
    seconds. ``execute`` defaults to :func:`papermill.execute_notebook` (tests inject their own).
    """
    root = Path(root).resolve()
    chapters = find_chapters(root)
    if only:
        unknown = sorted(set(only) - {c.stem for c in chapters})
        if unknown:
            raise ValueError(f"only: no chapter {unknown} in {root / 'book'}; there are {[c.stem for c in chapters]}")
        chapters = [c for c in chapters if c.stem in set(only)]
    if jobs < 1:
        raise ValueError(f"jobs must be a positive number of chapters run at once, got {jobs}")
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs)) if jobs > 1 else None
    with _environment(ROBUSTDL_DEVICE=device, OMP_NUM_THREADS=threads), ThreadPoolExecutor(jobs) as pool:
        records = list(pool.map(lambda c: _announce(run_chapter(c, set_name, out, root=root, device=device,
                                                                kernel_name=kernel_name, timeout=timeout,
                                                                execute=execute)), chapters))
    write_tables(out, root=root)
    return records


def _announce(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """Print one line per finished chapter (to stderr), as the run goes."""
    detail = f"  {record['error']}" if record["error"] else ""
    print(f"{record['status']:>7}  {record['seconds']:7.1f} s  {record['chapter']} [{record['set']}]{detail}",
          file=sys.stderr, flush=True)
    return record


def read_records(output: str | os.PathLike[str], root: str | os.PathLike[str] = ".") -> list[dict[str, Any]]:
    """The chapter records in ``output``, in the book's order."""
    rank = {c.stem: i for i, c in enumerate(find_chapters(root))}
    paths = [p for p in Path(output).glob("*.json") if p.name not in _TABLES]
    records = [json.loads(p.read_text()) for p in paths]
    return sorted(records, key=lambda r: (rank.get(r["chapter"], len(rank)), r["chapter"]))


def _number(value: Any) -> str:
    """A headline value, short: floats to 3 significant digits, long lists by their length."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return f"[{', '.join(map(_number, value))}]" if len(value) <= 4 else f"[{len(value)} values]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_number(v)}" for k, v in value.items()) + "}"
    return str(value)


def headline(results: Mapping[str, Any]) -> str:
    """A chapter's saved numbers as one line, ``key=value; ...``."""
    return "; ".join(f"{key}={_number(value)}" for key, value in results.items())


def markdown_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The records as a Markdown table: chapter, set, result, seconds, headline numbers or the error."""
    lines = ["| chapter | set | result | seconds | headline numbers (or the error) |", "|---|---|---|---:|---|"]
    for r in records:
        detail = (r["error"] or headline(r["results"])).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['chapter']} | {r['set']} | {r['status']} | {r['seconds']:.1f} | {detail} |")
    return "\n".join(lines) + "\n"


def write_tables(output: str | os.PathLike[str], root: str | os.PathLike[str] = ".") -> Path:
    """Write ``results.json``, ``results.csv`` and ``results.md`` from the records in ``output``; return the .md."""
    out = Path(output)
    records = read_records(out, root)
    _write_atomic(out / "results.json", json.dumps(records, indent=1) + "\n")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["chapter", "set", "device", "status", "seconds", "error", "results"])
    for r in records:
        writer.writerow([r["chapter"], r["set"], r["device"], r["status"], r["seconds"], r["error"],
                         json.dumps(r["results"])])
    _write_atomic(out / "results.csv", text.getvalue())
    _write_atomic(out / "results.md", markdown_table(records))
    return out / "results.md"


def _pytest_gpu(root: Path, output: Path) -> tuple[int, str]:
    """Run ``pytest -m gpu`` in ``root``; keep its output in ``output/pytest.txt``; return (status, summary)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    _write_atomic(output / "pytest.txt", done.stdout + done.stderr)
    lines = [line.strip("= ") for line in (done.stdout + done.stderr).splitlines() if _SUMMARY_LINE.search(line)]
    return done.returncode, lines[-1] if lines else f"no summary line (exit status {done.returncode})"


def _machine() -> list[str]:
    """Lines describing the machine: Python, torch, CUDA and the GPU's name."""
    import torch

    lines = [f"- Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU cores"]
    if torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, "
                     f"{torch.cuda.device_count()} device(s))")
    else:
        lines.append("- GPU: none (torch.cuda.is_available() is False)")
    return lines


def gpu_check(
    output: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] = ".",
    sets: Sequence[str] = GPU_SETS,
    device: str = "cuda",
    jobs: int = 4,
    only: Sequence[str] | None = None,
    pytest: bool = True,
    timeout: float | None = 900,
    execute: Callable[..., object] | None = None,
) -> tuple[bool, Path]:
    """``pytest -m gpu``, then every chapter with each of ``sets`` on ``device``; write ``report.md``.

    Returns (everything passed, the report's path). Raises RuntimeError before running anything
    when ``device`` is CUDA and torch sees no CUDA device.
    """
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"it needs a CUDA GPU for device {device!r}, but torch.cuda.is_available() is "
                           "False here; run it on a GPU machine (or pass --device cpu to try the report on the CPU)")
    root, out = Path(root).resolve(), Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    status, summary = _pytest_gpu(root, out) if pytest else (0, "not run (--no-pytest)")
    report = ["# GPU check", "", *_machine(), f"- `pytest -m gpu`: {summary}", ""]
    ok = status == 0
    for set_name in sets:
        records = run_chapters(set_name, out / set_name, root=root, only=only, device=device, jobs=jobs,
                               timeout=timeout, execute=execute)
        ok &= all(r["status"] != "failed" for r in records)
        counts = {s: sum(r["status"] == s for r in records) for s in ("passed", "failed", "skipped")}
        report += [f"## Set `{set_name}` on `{device}`: " + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
                   markdown_table(records)]
    minutes = (time.perf_counter() - start) / 60
    report += [f"Total wall time {minutes:.1f} min (up to {jobs} chapters at once). Reproduce: `make gpu-check`."]
    _write_atomic(out / "report.md", "\n".join(report) + "\n")
    return ok, out / "report.md"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder of the executed notebooks, records and tables")
    parser.add_argument("--only", nargs="+", metavar="STEM", help="run only these chapters (notebook stems)")
    parser.add_argument("--jobs", type=int, default=1, help="chapters run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed to each cell")
    parser.add_argument("--root", default=".", help="the repository root (default: the working directory)")
    return parser


def main_chapters(argv: Sequence[str]) -> int:
    """``chapters``: run the chapters with one set; exit status 1 when any failed."""
    parser = _parser("python -m robustdl.experiments chapters")
    parser.add_argument("--set", required=True, dest="set_name", help=f"a set name, or {DEFAULTS!r}")
    parser.add_argument("--device", default=None, help="$ROBUSTDL_DEVICE for the chapters, e.g. cpu or cuda")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    args = parser.parse_args(argv)
    try:
        records = run_chapters(args.set_name, args.output, root=args.root, only=args.only, device=args.device,
                               kernel_name=args.kernel, jobs=args.jobs, timeout=args.timeout)
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.error(str(error))
    print(markdown_table(records), end="")
    print(f"table: {Path(args.output) / 'results.md'} (and results.csv, results.json)")
    return 1 if any(r["status"] == "failed" for r in records) else 0


def main_gpu_check(argv: Sequence[str]) -> int:
    """``gpu-check``: pytest -m gpu and every chapter on the GPU; exit status 1 when anything failed."""
    parser = _parser("python -m robustdl.experiments gpu-check")
    parser.set_defaults(jobs=4, timeout=900.0)
    parser.add_argument("--sets", nargs="+", default=list(GPU_SETS), help=f"sets to run (default: {GPU_SETS})")
    parser.add_argument("--device", default="cuda", help="the device (default cuda; cpu only to try the report)")
    parser.add_argument("--no-pytest", action="store_true", help="skip pytest -m gpu")
    args = parser.parse_args(argv)
    try:
        ok, report = gpu_check(args.output, root=args.root, sets=args.sets, device=args.device, jobs=args.jobs,
                               only=args.only, pytest=not args.no_pytest, timeout=args.timeout)
    except RuntimeError as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.error(str(error))
    print(report.read_text(), end="")
    print(f"report: {report}")
    return 0 if ok else 1
