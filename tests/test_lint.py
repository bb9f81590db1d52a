"""The house style, checked with the tests: ruff's linter and formatter (settings in
pyproject.toml) on the sources, the tests and the benchmarks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "bench"]


@pytest.fixture(scope="module")
def ruff() -> str:
    path = shutil.which("ruff")
    if path is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return path


def test_ruff_lint_passes(ruff):
    result = subprocess.run([ruff, "check", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_as_it_is(ruff):
    result = subprocess.run([ruff, "format", "--check", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
