"""A pytest plugin that appends every test's outcome (and every benchmark's facts) to a JSON-lines file.

FASTCIFAR_BENCH_ROWS=PATH turns it on: each line is written as its test finishes, so a run
killed at a time limit keeps what it measured (scripts/gpu_report.py reads the file with
fastcifar.bench.benchreport.read_rows). benchmarks/conftest.py takes its hooks; the GPU report's
`tests` part loads it with `-p fastcifar.bench.rowlog`. It imports no torch.
"""

from __future__ import annotations

import json
import os

import pytest

ROWS_ENV = "FASTCIFAR_BENCH_ROWS"


def log_line(line: dict) -> None:
    path = os.environ.get(ROWS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")


def plain(value) -> bool:
    """A value JSON writes as it is (scalars, and lists and dicts of them): what a row keeps."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    """A benchmark's extra_info, as a row (before the fixture is torn down)."""
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    info = getattr(benchmark, "extra_info", None)
    if info:
        log_line({"kind": "row", "file": item.path.stem, "name": item.name,
                  **{k: v for k, v in info.items() if plain(v)}})


def pytest_runtest_logreport(report):
    """Each test's outcome: why it was skipped, or the last line and the message of its failure."""
    if report.when == "call" or report.outcome != "passed":
        why = message = None
        if report.skipped and isinstance(report.longrepr, tuple):
            why = str(report.longrepr[-1])
        elif report.failed and report.longrepr:
            why = str(report.longrepr).strip().splitlines()[-1][:300]
            lines = str(getattr(getattr(report.longrepr, "reprcrash", None), "message", "") or "").strip().splitlines()
            message = lines[0][:300] if lines else None
        log_line({"kind": "outcome", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                  "why": why, "message": message})
