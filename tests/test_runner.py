"""The chapter runner over a tiny book of two notebooks: sets, skips, failures, the device variable,
the tables, and the GPU check's report (with an injected ``execute``, and once with papermill)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
import torch
import yaml

import robustdl
from robustdl import experiments, runner
from robustdl.runner import DEFAULTS, find_chapters, gpu_check, load_sets, notebook_parameters, run_chapters

BODY = "from robustdl.experiments import save_results\nsave_results({'product': a * b}, results_path)"


def write_notebook(path: Path, body: str = BODY) -> Path:
    """A notebook with a parameters cell (a, b, results_path) and one body cell."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('a = 1  # a comment\nb: int = 2\nresults_path = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def write_sets(root: Path, stem: str, notebook: str, sets: dict[str, Any]) -> Path:
    path = root / "experiments" / "chapters" / f"{stem}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"notebook": notebook, "sets": sets}))
    return path


@pytest.fixture
def book(tmp_path: Path) -> Path:
    """A repository root with two chapters, listed in _toc.yml as beta then alpha; only alpha has sets."""
    write_notebook(tmp_path / "book" / "1" / "alpha.ipynb")
    write_notebook(tmp_path / "book" / "0" / "beta.ipynb")
    toc = {"root": "book/intro", "parts": [{"chapters": [{"file": "book/0/beta"}, {"file": "book/1/alpha"}]}]}
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump(toc))
    write_sets(tmp_path, "alpha", "book/1/alpha.ipynb", {"smoke": {"a": 3}, "typo": {"c": 1}})
    return tmp_path


class FakeExecute:
    """Stands in for papermill: records each call and the $ROBUSTDL_DEVICE it ran under; writes a*b."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail

    def __call__(self, input_path: str, output_path: str, parameters: dict[str, Any], **kwargs: Any) -> None:
        self.calls.append({"input": input_path, "parameters": parameters,
                           "device": os.environ.get("ROBUSTDL_DEVICE"), **kwargs})
        Path(output_path).write_text("{}")
        if self.fail and self.fail in input_path:
            raise RuntimeError("boom\nsecond line")
        a, b = parameters.get("a", 1), parameters.get("b", 2)
        experiments.save_results({"product": a * b, "share": 1 / 3}, parameters["results_path"])


def test_chapters_come_in_the_order_of_the_toc_with_their_sets(book: Path) -> None:
    chapters = find_chapters(book)
    assert [(c.stem, c.notebook.as_posix()) for c in chapters] == [("beta", "book/0/beta.ipynb"),
                                                                   ("alpha", "book/1/alpha.ipynb")]
    assert chapters[1].sets == {"smoke": {"a": 3}, "typo": {"c": 1}} and chapters[0].sets == {}
    assert chapters[1].parameters(DEFAULTS) == {} and chapters[0].parameters("smoke") is None


def test_a_sets_file_naming_another_notebook_is_rejected(book: Path) -> None:
    write_sets(book, "beta", "book/1/alpha.ipynb", {"smoke": {}})
    with pytest.raises(ValueError, match=r"chapter 'beta' is book/0/beta\.ipynb"):
        find_chapters(book)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["x"], "a mapping with keys 'notebook' and 'sets'"),
        ({"notebook": "a.ipynb"}, "a mapping with keys"),
        ({"notebook": "a.py", "sets": {"s": {}}}, "'notebook' must be the chapter's .ipynb"),
        ({"notebook": "a.ipynb", "sets": {}}, "'sets' must map set names"),
        ({"notebook": "a.ipynb", "sets": {"defaults": {}}}, "'defaults' is reserved"),
        ({"notebook": "a.ipynb", "sets": {"s": {"results_path": "x"}}}, "reserves for the results file"),
        ({"notebook": "a.ipynb", "sets": {"s": {"n": {1, 2}}}}, "must be plain JSON"),
    ],
)
def test_load_sets_rejects_bad_files(tmp_path: Path, spec: Any, message: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.dump(spec))
    with pytest.raises(ValueError, match=message):
        load_sets(path)


def test_notebook_parameters_reads_the_parameters_cell(book: Path) -> None:
    assert notebook_parameters(book / "book" / "1" / "alpha.ipynb") == {"a": "1", "b": "2", "results_path": '""'}


def test_defaults_run_every_chapter_on_the_device_asked_for(book: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROBUSTDL_DEVICE", raising=False)
    fake, out = FakeExecute(), book / "runs" / "defaults"
    records = run_chapters(DEFAULTS, out, root=book, device="cpu", timeout=5, execute=fake)
    assert [(r["chapter"], r["status"], r["results"]) for r in records] == [
        ("beta", "passed", {"product": 2, "share": 1 / 3}), ("alpha", "passed", {"product": 2, "share": 1 / 3})]
    assert [c["parameters"] for c in fake.calls] == [{"results_path": str(out / "beta.json")},
                                                     {"results_path": str(out / "alpha.json")}]
    assert {c["device"] for c in fake.calls} == {"cpu"} and "ROBUSTDL_DEVICE" not in os.environ
    assert fake.calls[0]["cwd"] == str(book / "book" / "0") and fake.calls[0]["execution_timeout"] == 5
    assert json.loads((out / "alpha.json").read_text())["results"] == {"product": 2, "share": 1 / 3}
    assert [r["chapter"] for r in json.loads((out / "results.json").read_text())] == ["beta", "alpha"]
    assert (out / "results.csv").read_text().splitlines()[0] == "chapter,set,device,status,seconds,error,results"
    assert "| alpha | defaults | passed |" in (out / "results.md").read_text()
    assert "product=2; share=0.333" in (out / "results.md").read_text()


def test_a_named_set_runs_where_defined_and_skips_elsewhere(book: Path) -> None:
    fake, out = FakeExecute(), book / "runs" / "smoke"
    records = run_chapters("smoke", out, root=book, execute=fake)
    assert [(r["chapter"], r["status"]) for r in records] == [("beta", "skipped"), ("alpha", "passed")]
    assert records[0]["error"].startswith("no set 'smoke'") and records[1]["results"]["product"] == 6
    assert [c["parameters"]["a"] for c in fake.calls] == [3] and records[1]["device"] == "auto"


def test_failures_are_recorded_and_the_others_still_run(book: Path) -> None:
    out = book / "runs" / "failing"
    records = run_chapters(DEFAULTS, out, root=book, execute=FakeExecute(fail="beta"))
    assert [(r["chapter"], r["status"], r["error"]) for r in records] == [
        ("beta", "failed", "RuntimeError: boom"), ("alpha", "passed", "")]
    assert records[0]["results"] == {} and "| beta | defaults | failed |" in (out / "results.md").read_text()


def test_an_unknown_parameter_fails_without_running(book: Path) -> None:
    fake = FakeExecute()
    (record,) = run_chapters("typo", book / "runs" / "typo", root=book, only=["alpha"], execute=fake)
    assert record["status"] == "failed" and "['c'] are not in the notebook's parameters cell" in record["error"]
    assert fake.calls == []


def test_a_chapter_that_saves_nothing_fails(book: Path) -> None:
    (record,) = run_chapters(DEFAULTS, book / "runs" / "x", root=book, only=["beta"], execute=lambda *a, **k: None)
    assert record["status"] == "failed" and "save_results" in record["error"]


def test_only_filters_and_rejects_unknown_stems(book: Path) -> None:
    out = book / "runs" / "only"
    run_chapters(DEFAULTS, out, root=book, execute=FakeExecute())
    fake = FakeExecute(fail="alpha")
    run_chapters(DEFAULTS, out, root=book, only=["alpha"], execute=fake)
    assert len(fake.calls) == 1
    table = json.loads((out / "results.json").read_text())  # the folder's records: beta kept, alpha re-run
    assert [(r["chapter"], r["status"]) for r in table] == [("beta", "passed"), ("alpha", "failed")]
    with pytest.raises(ValueError, match=r"no chapter \['gamma'\]"):
        run_chapters(DEFAULTS, out, root=book, only=["gamma"], execute=fake)
    with pytest.raises(ValueError, match="jobs must be"):
        run_chapters(DEFAULTS, out, root=book, jobs=0, execute=fake)


def test_papermill_runs_chapters_in_parallel_on_the_device_given(book: Path) -> None:
    pytest.importorskip("papermill")
    body = ("import os, robustdl\nfrom robustdl.experiments import save_results\n"
            "save_results({'device': str(robustdl.device()), 'threads': os.environ.get('OMP_NUM_THREADS', ''),"
            " 'product': a * b}, results_path)")
    write_notebook(book / "book" / "1" / "alpha.ipynb", body)
    write_notebook(book / "book" / "0" / "beta.ipynb", body.replace("a * b", "1 / 0"))
    assert experiments.main(["chapters", "--set", "smoke", "--output", str(book / "out"), "--root", str(book),
                             "--only", "alpha", "--device", "cpu"]) == 0
    records = run_chapters(DEFAULTS, book / "out", root=book, device="meta", jobs=2)
    assert [(r["chapter"], r["status"]) for r in records] == [("beta", "failed"), ("alpha", "passed")]
    assert "ZeroDivisionError" in records[0]["error"] and records[1]["results"]["device"] == "meta"
    assert records[1]["results"]["threads"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert (book / "out" / "alpha.ipynb").exists() and records[1]["seconds"] > 0


def test_device_honours_robustdl_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ROBUSTDL_DEVICE", "cpu")
    assert robustdl.device() == torch.device("cpu")
    monkeypatch.setenv("ROBUSTDL_DEVICE", "cuda:1")
    assert robustdl.device() == torch.device("cuda", 1)
    monkeypatch.setenv("ROBUSTDL_DEVICE", "gpu please")
    with pytest.raises(ValueError, match="ROBUSTDL_DEVICE must name a torch device"):
        robustdl.device()
    monkeypatch.setenv("ROBUSTDL_DEVICE", "")
    assert robustdl.device() == torch.device("cuda")


def test_gpu_check_without_cuda_stops_with_a_message(
    book: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert experiments.main(["gpu-check", "--output", str(book / "gpu"), "--root", str(book)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (book / "gpu").exists()


def test_gpu_check_report_lists_every_set_and_chapter(book: Path) -> None:
    ok, report = gpu_check(book / "gpu", root=book, sets=[DEFAULTS, "smoke"], device="cpu", pytest=False,
                           execute=FakeExecute(fail="beta"))
    text = report.read_text()
    assert not ok and report == book / "gpu" / "report.md"
    assert f"torch {torch.__version__}" in text and "`pytest -m gpu`: not run" in text
    assert "## Set `defaults` on `cpu`: 1 passed, 1 failed, 0 skipped" in text
    assert "## Set `smoke` on `cpu`: 1 passed, 0 failed, 1 skipped" in text
    assert "| alpha | smoke | passed |" in text and "| beta | defaults | failed |" in text
    assert (book / "gpu" / "smoke" / "results.md").exists()


def test_gpu_check_runs_pytest_on_the_gpu_marker(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: on a GPU\n")
    (tmp_path / "tests" / "test_g.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_a():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_b():\n    pytest.skip('no GPU')\n\ndef test_c():\n    raise AssertionError\n")
    status, summary = runner._pytest_gpu(tmp_path, tmp_path)
    assert status == 0 and summary.startswith("1 passed, 1 skipped, 1 deselected")
    assert "1 passed" in (tmp_path / "pytest.txt").read_text()
