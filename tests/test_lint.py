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


SRC = ROOT / "src" / "gig"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The gig modules ``path`` imports anywhere: at module level, inside functions (run later)
    and under ``if TYPE_CHECKING`` alike, so that the layers stay layers, not only the import."""
    import ast

    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gig"))
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if module.startswith("gig"):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)  # `from . import x`
    return found


def test_no_import_cycle_in_the_package():
    """No module of gig imports, directly or through others, a module that imports it back (any
    import: at module level, in a function or for type checking)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    # a submodule's import of its own package is not a cycle: the package is already being imported
    graph = {
        m: {i for i in _imports(p) if i in modules and i != m and not m.startswith(i + ".")} for m, p in modules.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m], _ = 1, stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m], _ = 2, stack.pop()
        return None

    for m in sorted(modules):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " → ".join(cycle)


def test_no_function_is_longer_than_60_lines():
    import ast

    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
