"""Test-wide setup: run Triton kernels through the interpreter where torch sees no CUDA device."""
# This must run before anything imports torch or triton: triton decides at decoration time
# (when a module defining a @triton.jit kernel is imported) whether kernels are interpreted.
# torch answers in a child process (fastcifar.bench.benchreport imports no torch), once per session
# tree: the answer is kept in FASTCIFAR_CUDA for child processes.
import os

from fastcifar.bench.benchreport import cuda_available

if not cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _write_digits(out: Path, noise: float = 0.4) -> Path:
    """scikit-learn's digits with `noise` symmetric label noise, as .beton files in `out`."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "write_beton.py"), "--source", "digits", "--noise",
                    str(noise), "--noise-kind", "symmetric", "--out-dir", str(out), "--quiet"],
                   check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def make_digits():
    """write_digits(out, noise=0.4) -> out: digits .beton files with that share of wrong labels."""
    return _write_digits


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The session's digits data with 40% symmetric noise (the demo's)."""
    return _write_digits(tmp_path_factory.mktemp("digits40"))
