"""Sweeps over a tiny notebook: real papermill runs for the whole path, an injected
``execute`` for the bookkeeping (resuming, failures, ids), and save_results / load_grid checks."""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pytest
import torch
import yaml

from robustdl import experiments
from robustdl.experiments import (
    Grid,
    SweepError,
    collect,
    committed_results,
    load_grid,
    point_id,
    points,
    run_grid,
    save_results,
)

PRODUCT = "from robustdl.experiments import save_results\nsave_results({'product': a * b}, results_path)"
FAIL_AT_3 = "if a == 3:\n    raise RuntimeError('boom at a=3')\n" + PRODUCT


def write_notebook(path: Path, body: str) -> Path:
    """A notebook with a parameters cell (a, b, results_path) and one body cell."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('a = 1\nb = 2\nresults_path = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)
    return path


def write_yaml(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


class FakeExecute:
    """Stands in for papermill: records calls, writes the output notebook's papermill
    metadata and (unless ``write_results`` is off) the results a*b."""

    def __init__(self, write_results: bool = True) -> None:
        self.calls: list[dict[str, Any]] = []
        self.write_results = write_results

    def __call__(self, input_path: str, output_path: str, parameters: dict[str, Any], **kwargs: Any) -> None:
        self.calls.append({"input": input_path, "output": output_path, "parameters": parameters, **kwargs})
        nb = {"cells": [], "metadata": {"papermill": {"parameters": parameters}}, "nbformat": 4, "nbformat_minor": 5}
        Path(output_path).write_text(json.dumps(nb))
        if self.write_results:
            save_results({"product": parameters["a"] * parameters["b"]}, parameters["results_path"])

    @property
    def ids(self) -> list[str]:
        return [Path(call["output"]).stem for call in self.calls]


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory) -> Grid:
    """A 2x2 sweep executed for real by papermill, from a YAML with cwd-relative paths."""
    pytest.importorskip("papermill")
    root = tmp_path_factory.mktemp("sweep")
    write_notebook(root / "tiny.ipynb", PRODUCT)
    spec = {
        "notebook": "tiny.ipynb",
        "output": "runs/tiny",
        "parameters": {"label": "x"},
        "grid": {"a": [1, 2], "b": [3, 4]},
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        grid = load_grid(write_yaml(root / "tiny.yaml", spec))
        run_grid(grid, progress=False)
    return dataclasses.replace(grid, notebook=root / grid.notebook, output=root / grid.output)


def copy_sweep(grid: Grid, tmp_path: Path) -> Grid:
    """The real sweep's output copied to ``tmp_path``, free to change."""
    shutil.copytree(grid.output, tmp_path / "out")
    return dataclasses.replace(grid, output=tmp_path / "out")


def test_real_sweep_writes_one_notebook_per_point_and_the_table(real_sweep: Grid) -> None:
    out = real_sweep.output
    ids = ["a=1,b=3", "a=1,b=4", "a=2,b=3", "a=2,b=4"]
    assert sorted(p.stem for p in out.glob("*.ipynb")) == ids
    executed = nbformat.read(out / "a=2,b=3.ipynb", as_version=4)
    assert executed.metadata.papermill.parameters["a"] == 2
    assert any("injected-parameters" in cell.metadata.get("tags", []) for cell in executed.cells)
    rows = read_csv(out / "results.csv")
    assert [row["point"] for row in rows] == ids
    assert list(rows[0]) == ["point", "a", "b", "label", "product"]  # parameters in name order, then results
    assert [int(r["a"]) * int(r["b"]) for r in rows] == [int(r["product"]) for r in rows] == [3, 4, 6, 8]
    assert {r["label"] for r in rows} == {"x"}
    table = json.loads((out / "results.json").read_text())
    assert [(r["a"], r["b"], r["product"]) for r in table] == [(1, 3, 3), (1, 4, 4), (2, 3, 6), (2, 4, 8)]
    assert temp_files(out) == []


def test_rerun_resumes_without_executing_anything(real_sweep: Grid, tmp_path: Path) -> None:
    grid = copy_sweep(real_sweep, tmp_path)
    fake = FakeExecute()
    table = run_grid(grid, progress=False, execute=fake)
    assert fake.calls == []
    assert [r["product"] for r in read_csv(table)] == ["3", "4", "6", "8"]


def test_deleted_results_rerun_exactly_that_point(real_sweep: Grid, tmp_path: Path) -> None:
    papermill = pytest.importorskip("papermill")
    grid = copy_sweep(real_sweep, tmp_path)
    (grid.output / "a=2,b=3.json").unlink()
    ran: list[str] = []

    def counting(input_path: str, output_path: str, **kwargs: Any) -> Any:
        ran.append(Path(output_path).stem)
        return papermill.execute_notebook(input_path, output_path, **kwargs)

    table = run_grid(grid, progress=False, execute=counting)
    assert ran == ["a=2,b=3"]
    assert json.loads((grid.output / "a=2,b=3.json").read_text()) == {"product": 6}
    assert [r["product"] for r in read_csv(table)] == ["3", "4", "6", "8"]


def test_failing_point_is_reported_and_the_others_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("papermill")
    monkeypatch.chdir(tmp_path)
    write_notebook(tmp_path / "fails.ipynb", FAIL_AT_3)
    spec = {"notebook": "fails.ipynb", "output": "runs/fails", "grid": {"a": [1, 3], "b": [2]}}
    assert experiments.main([str(write_yaml(tmp_path / "fails.yaml", spec)), "--no-progress"]) == 1
    assert "a=3,b=2: RuntimeError: boom at a=3" in capsys.readouterr().err
    out = tmp_path / "runs" / "fails"
    assert (out / "a=3,b=2.ipynb").exists() and not (out / "a=3,b=2.json").exists()
    assert [(r["point"], r["product"]) for r in read_csv(out / "results.csv")] == [("a=1,b=2", "2")]


def test_failures_are_collected_into_sweep_error(tmp_path: Path) -> None:
    grid = Grid(write_notebook(tmp_path / "nb.ipynb", PRODUCT), tmp_path / "out", {}, {"a": [1, 2, 3], "b": [1]})

    def fail_at_2(input_path: str, output_path: str, parameters: dict[str, Any], **kwargs: Any) -> None:
        if parameters["a"] == 2:
            raise OSError("disk full\nmore detail")
        FakeExecute()(input_path, output_path, parameters, **kwargs)

    with pytest.raises(SweepError) as info:
        run_grid(grid, progress=False, execute=fail_at_2)
    assert info.value.failures == {"a=2,b=1": "OSError: disk full"}
    assert [r["point"] for r in collect(grid.output)] == ["a=1,b=1", "a=3,b=1"]
    assert info.value.table == grid.output / "results.csv" and len(read_csv(info.value.table)) == 2


def test_notebook_that_saves_no_results_is_a_failure(tmp_path: Path) -> None:
    grid = Grid(write_notebook(tmp_path / "nb.ipynb", "pass"), tmp_path / "out", {}, {"a": [1], "b": [2]})
    with pytest.raises(SweepError, match="save_results") as info:
        run_grid(grid, progress=False, execute=FakeExecute(write_results=False))
    assert list(info.value.failures) == ["a=1,b=2"]


def test_run_grid_passes_parameters_kernel_and_working_directory(tmp_path: Path) -> None:
    (tmp_path / "book").mkdir()
    notebook = write_notebook(tmp_path / "book" / "nb.ipynb", PRODUCT)
    grid = Grid(notebook, tmp_path / "out", {"n": 5}, {"a": [1], "b": [2, 3]})
    fake = FakeExecute()
    run_grid(grid, kernel_name="other", progress=False, execute=fake)
    assert fake.ids == ["a=1,b=2", "a=1,b=3"]
    call = fake.calls[0]
    assert call["parameters"] == {"n": 5, "a": 1, "b": 2, "results_path": str(tmp_path / "out" / "a=1,b=2.json")}
    assert call["kernel_name"] == "other" and call["cwd"] == str(tmp_path / "book")


def test_missing_notebook_raises(tmp_path: Path) -> None:
    grid = Grid(tmp_path / "absent.ipynb", tmp_path / "out", {}, {"a": [1]})
    with pytest.raises(FileNotFoundError, match=r"absent\.ipynb"):
        run_grid(grid, progress=False, execute=FakeExecute())


def test_points_merge_fixed_parameters_with_each_combination() -> None:
    grid = Grid(Path("nb.ipynb"), Path("out"), {"n": 5}, {"model": ["m1", "m2"], "eps": [0.1, 0.2]})
    assert points(grid) == [
        {"n": 5, "model": "m1", "eps": 0.1},
        {"n": 5, "model": "m1", "eps": 0.2},
        {"n": 5, "model": "m2", "eps": 0.1},
        {"n": 5, "model": "m2", "eps": 0.2},
    ]


def test_point_id_is_readable_safe_and_distinct() -> None:
    assert point_id({"model_name": "mnist_mlp", "eps": 0.1}) == "model_name=mnist_mlp,eps=0.1"
    assert point_id({"flag": True, "x": None}) == "flag=true,x=null"
    slashed, underscored = point_id({"x": "a/b"}), point_id({"x": "a_b"})
    assert slashed.startswith("x=a_b-") and underscored == "x=a_b"
    long = point_id({"name": "z" * 200})
    assert len(long) <= 89 and long != point_id({"name": "z" * 201})
    assert point_id({"steps": [1, 2]}) == point_id({"steps": [1, 2]})
    for pid in (slashed, long, point_id({"steps": [1, 2]})):
        assert all(c.isalnum() or c in "._=,+-" for c in pid)


def test_grid_values_with_the_same_id_are_rejected(tmp_path: Path) -> None:
    grid = Grid(write_notebook(tmp_path / "nb.ipynb", PRODUCT), tmp_path / "out", {}, {"a": [1, "1"], "b": [1]})
    fake = FakeExecute()
    with pytest.raises(ValueError, match="same point id"):
        run_grid(grid, progress=False, execute=fake)
    assert fake.calls == []


def test_dry_run_lists_points_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = {"notebook": str(tmp_path / "nb.ipynb"), "output": str(tmp_path / "out"), "grid": {"a": [1, 2], "b": [3]}}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a=2,b=3.json").write_text("{}")
    assert experiments.main([str(write_yaml(tmp_path / "g.yaml", spec)), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["todo", "a=1,b=3"], ["done", "a=2,b=3"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a=2,b=3.json"]


def test_bad_yaml_exits_with_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        experiments.main([str(write_yaml(tmp_path / "g.yaml", {"notebook": "nb.ipynb", "output": "o"}))])
    assert info.value.code == 2 and "missing key 'grid'" in capsys.readouterr().err


GOOD = {"notebook": "nb.ipynb", "output": "out", "parameters": {"n": 5}, "grid": {"eps": [0.1]}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"notebook": None}, "missing key 'notebook'"),
        ({"grid": None}, "missing key 'grid'"),
        ({"grids": {"eps": [0.1]}}, r"unknown key\(s\) \['grids'\]"),
        ({"notebook": "nb.py"}, "'notebook' must be an .ipynb"),
        ({"output": 3}, "'output' must be a path"),
        ({"grid": {"eps": 0.1}}, r"grid\['eps'\] must be a non-empty list"),
        ({"grid": {"eps": []}}, r"grid\['eps'\] must be a non-empty list"),
        ({"grid": {}}, "'grid' must map at least one"),
        ({"grid": [0.1]}, "'grid' must be a mapping"),
        ({"grid": {"n": [1, 2]}}, r"\['n'\] set in both 'parameters' and 'grid'"),
        ({"parameters": {"results_path": "x"}}, "'results_path', which the sweep reserves"),
        ({"grid": {"my-eps": [0.1]}}, "'my-eps'; names must be Python identifiers"),
        ({"parameters": {"day": "2021-01-01"}}, r"parameters\['day'\] = .* must be plain JSON"),
    ],
)
def test_load_grid_rejects_bad_specs(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    spec = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    text = yaml.safe_dump(spec).replace("'2021-01-01'", "2021-01-01")  # a YAML date, not a string
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_grid(tmp_path / "g.yaml")


def test_load_grid_rejects_a_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("- notebook\n- output\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_grid(tmp_path / "g.yaml")


def test_save_results_is_a_no_op_without_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_results({"acc": 0.5}, "")
    save_results({"acc": 0.5}, None)
    assert list(tmp_path.iterdir()) == []


def test_save_results_converts_numpy_and_torch_values(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "r.json"
    results = {
        "acc": np.float32(0.5),
        "n": np.int64(3),
        "ok": np.bool_(True),
        "loss": torch.tensor(0.25),
        "curve": torch.tensor([0.5, 0.125]),
        "per_class": {"0": np.array([1, 2])},
    }
    save_results(results, str(path))
    loaded = json.loads(path.read_text())
    assert loaded == {"acc": 0.5, "n": 3, "ok": True, "loss": 0.25, "curve": [0.5, 0.125], "per_class": {"0": [1, 2]}}
    assert type(loaded["n"]) is int and type(loaded["ok"]) is bool


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({"model": object()}, r"results\['model'\] is a object"),
        ({"nested": {"x": {1, 2}}}, r"results\['nested'\]\['x'\] is a set"),
        ({"curve": [0.1, 1j]}, r"results\['curve'\]\[1\] is a complex"),
        ({1: 0.5}, "keys must be strings"),
    ],
)
def test_save_results_rejects_what_json_cannot_hold(tmp_path: Path, results: dict[Any, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        save_results(results, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_save_results_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.json"
    save_results({"acc": 0.5}, path)
    save_results({"acc": 0.75}, path)
    assert json.loads(path.read_text()) == {"acc": 0.75} and temp_files(tmp_path) == []
    assert path.stat().st_mode & 0o777 == 0o644

    def crash(src: str, dst: str) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed mid-write"):
        save_results({"acc": 0.0}, path)
    assert json.loads(path.read_text()) == {"acc": 0.75} and temp_files(tmp_path) == []


def test_committed_results_are_found_from_a_chapter_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = [{"point": "a=1", "a": 1, "acc": 0.5}]
    (tmp_path / "experiments" / "runs" / "grid").mkdir(parents=True)
    (tmp_path / "experiments" / "runs" / "grid" / "results.json").write_text(json.dumps(table))
    (tmp_path / "book" / "part").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "book" / "part")
    assert committed_results("experiments/runs/grid") == table


def test_committed_results_missing_everywhere_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="run the sweep"):
        committed_results("experiments/runs/none", base=(tmp_path / "nowhere").as_uri())


def test_repository_url_is_pyprojects_read_from_the_installed_metadata() -> None:
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (declared,) = re.findall(r'^Repository = "([^"]+)"$', pyproject, flags=re.MULTILINE)
    assert experiments.repository_url() == declared.rstrip("/")
    owner_name = declared.removeprefix("https://github.com/").rstrip("/")
    assert experiments.raw_url() == f"https://raw.githubusercontent.com/{owner_name}/main"
    assert experiments.raw_url("dev").endswith(f"/{owner_name}/dev")


class FakeMetadata:
    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    def get_all(self, key: str) -> list[str]:
        return self.urls if key == "Project-URL" else []


def test_repository_url_without_metadata_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "metadata", missing)
    with pytest.raises(RuntimeError, match="pip install"):
        experiments.repository_url()
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: FakeMetadata(["Homepage, https://x.org"]))
    with pytest.raises(RuntimeError, match=r"no Repository URL \(it has \['Homepage'\]\)"):
        experiments.repository_url()
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: FakeMetadata(["Repository, https://x.org/a/b/"]))
    assert experiments.repository_url() == "https://x.org/a/b"
    with pytest.raises(RuntimeError, match="not on GitHub"):
        experiments.raw_url()


def test_committed_results_read_from_the_raw_repository_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    asked: list[str] = []

    def offline(url: str, timeout: float) -> None:
        asked.append(url)
        raise OSError("offline")

    monkeypatch.setattr(experiments.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="offline"):
        committed_results("experiments/runs/grid")
    assert asked == [f"{experiments.raw_url()}/experiments/runs/grid/results.json"]
