"""nbval over the book, one notebook at a time, with each chapter's time.

Usage (what `make nbval` runs): python .ci/nbval_times.py NOTEBOOK... [-- EXTRA PYTEST ARGS]

Each notebook is re-executed and compared by `pytest --nbval` with book/sanitize.cfg; its output is
streamed as it comes. At the end: a table `chapter  seconds  result` and one pytest-style summary
line summing every run. The exit status is 1 when any notebook failed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|warnings?|deselected)\b")


def run(notebook: str, extra: list[str]) -> tuple[int, float, Counter[str]]:
    """pytest --nbval on one notebook: (exit status, seconds, counts of its summary line)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", notebook,
               "--nbval-sanitize-with", "book/sanitize.cfg", *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    counts: Counter[str] = Counter()
    assert process.stdout is not None
    for line in process.stdout:
        print(line, end="", flush=True)
        found = SUMMARY.findall(line)
        if found and ("passed" in line or "failed" in line or "error" in line) and " in " in line:
            counts = Counter({kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found})
    status = process.wait()
    return status, time.perf_counter() - start, counts


def main(argv: list[str]) -> int:
    notebooks, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    rows, total = [], Counter()
    start = time.perf_counter()
    for notebook in notebooks:
        status, seconds, counts = run(notebook, extra)
        total += counts
        result = "passed" if status == 0 else f"FAILED ({counts['failed']} failed)" if counts["failed"] else "FAILED"
        rows.append((Path(notebook).stem, seconds, result))
    width = max([len(stem) for stem, _, _ in rows] + [7])
    print(f"\n{'chapter':<{width}}  {'seconds':>7}  result")
    for stem, seconds, result in rows:
        print(f"{stem:<{width}}  {seconds:7.1f}  {result}")
    parts = [f"{total[kind]} {kind}" for kind in ("failed", "passed", "skipped", "error") if total[kind]]
    failed = sum(1 for *_, result in rows if result != "passed")
    print(f"===== nbval: {', '.join(parts) or 'no tests ran'} in {time.perf_counter() - start:.1f}s "
          f"({len(rows)} notebooks, {failed} failed) =====")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
