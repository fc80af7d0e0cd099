"""The house rules of the code layout: Ray only where Ray is the point, the core never imports the adapters, no import
cycles, and files of about 400 lines at most unless their docstring says why ("long:")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY_MODULES = {"pipeline.scan.job", "pipeline.scan.progress", "pipeline.cli.serve"}  # the scan, its metrics, serve
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PIPELINE = {_module(p): p for p in sorted((ROOT / "pipeline").rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports when it runs, function-level imports included (``if TYPE_CHECKING:`` blocks,
    which never run, excluded), as absolute names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import check` names a module
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {i for i in _imports(p, m) if i in PIPELINE and i != m} for m, p in PIPELINE.items()}


@pytest.mark.parametrize("module", sorted(m for m in set(PIPELINE) - RAY_MODULES if not m.endswith("__main__")))
def test_importing_the_core_does_not_import_ray(module):
    code = f"import sys, {module}; sys.exit(7 if 'ray' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"importing {module} imports ray:\n{result.stderr[-2000:]}"


def test_ray_appears_only_in_the_modules_where_it_is_the_point():
    users = {m for m, p in PIPELINE.items() if any(i == "ray" or i.startswith("ray.") for i in _imports(p, m))}
    assert users <= RAY_MODULES, f"these pipeline modules import ray: {sorted(users - RAY_MODULES)}"


def test_the_core_never_imports_the_adapters():
    offenders = {
        m: sorted(i for i in _imports(p, m) if i.split(".")[0] in ("deployments", "bench", "tests"))
        for m, p in PIPELINE.items()
        if m != "pipeline.cli.serve"  # `diffguard serve` deploys the Serve app: the one way in
    }
    assert not {m: i for m, i in offenders.items() if i}, offenders
    serve = {i.split(".")[0] for i in _imports(PIPELINE["pipeline.cli.serve"], "pipeline.cli.serve")}
    assert "deployments" in serve  # the exception above is still needed; drop it when it is not


def test_benchmarks_never_import_tests():
    offenders = {
        p.name: sorted(i for i in _imports(p, _module(p)) if i.split(".")[0] == "tests")
        for p in (ROOT / "bench").glob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_no_import_cycles_in_the_core():
    graph = _graph()
    assert graph["pipeline.checker"] and graph["pipeline.cli"], "the import graph is empty: the parser is broken"
    done: set[str] = set()
    stack: list[str] = []

    def walk(node: str) -> None:
        if node in stack:
            cycle = stack[stack.index(node) :] + [node]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            walk(nxt)
        stack.pop()
        done.add(node)

    for module in sorted(graph):
        walk(module)


def test_files_stay_short_or_say_why():
    long = []
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "deployments").rglob("*.py")]):
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "long:" not in doc:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, f"over {MAX_LINES} lines without a 'long:' reason in the module docstring: {long}"
