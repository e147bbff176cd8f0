"""House style is enforced by the test suite: ruff lint on src/tests/benchmarks, and mypy on src/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_clean():
    r = _run("ruff", "check", "src", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout[-4000:]


def test_mypy_clean():
    r = _run("mypy", "src/lowbit")
    assert r.returncode == 0, r.stdout[-4000:]
