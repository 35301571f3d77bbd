"""The package's shape: small modules, short functions, imports that flow one way.

These are measured with :mod:`ast` on the source files, so a new module is covered the moment
it exists. Each check reports every offender, not just the first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "selfflow"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports when it is imported (not inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {t for t in targets if t in known and t != name}


def _all_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``name`` imports anywhere, functions included."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets.add(node.module)
            targets.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in known and t != name}


def test_no_module_is_over_the_line_limit() -> None:
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_the_line_limit() -> None:
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def _parents(name: str) -> set[str]:
    """Importing ``a.b.c`` imports ``a`` and ``a.b`` first: those count as imports too."""
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def test_find_cycle_finds_a_cycle_and_only_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_package_modules() -> None:
    modules = _modules()
    known = set(modules)
    graph = {
        name: {
            t
            for t in _module_level_imports(name, path, known)
            if t not in _parents(name)  # a package's own __init__ runs before its modules anyway
        }
        for name, path in modules.items()
    }
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _is_cli(name: str) -> bool:
    last = name.rpartition(".")[2]
    return last == "cli" or last.endswith("_cli")


def test_nothing_below_the_command_line_imports_a_command_line_module() -> None:
    modules = _modules()
    known = set(modules)
    offenders = {
        name: sorted(t for t in _all_imports(name, path, known) if _is_cli(t))
        for name, path in modules.items()
        if not _is_cli(name) and name != f"{PACKAGE}.__main__"
    }
    offenders = {name: cli for name, cli in offenders.items() if cli}
    assert not offenders, f"modules below the CLI that import a CLI module: {offenders}"


def test_the_checkpoint_loader_and_the_downloader_do_not_import_each_other() -> None:
    """Even inside functions: the cache folder and the HTTP client are below both."""
    modules = _modules()
    known = set(modules)
    checkpoint, download = f"{PACKAGE}.checkpoint", f"{PACKAGE}.download"
    assert checkpoint not in _all_imports(download, modules[download], known)


@pytest.mark.parametrize("source", ["import os\n", "from selfflow import cli\n"])
def test_the_import_reader_sees_module_level_imports(tmp_path: Path, source: str) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source + "def f():\n    import selfflow.model\n", encoding="utf-8")
    found = _module_level_imports("selfflow.probe", path, {"selfflow.cli", "selfflow.model"})
    assert found == ({"selfflow.cli"} if "cli" in source else set())


@pytest.mark.parametrize("phrase", ["FACTS", "the issue", "shared/"])
def test_no_source_points_outside_the_repository(phrase: str) -> None:
    """Comments and docstrings state facts themselves instead of citing files users lack."""
    found = [
        f"{path.relative_to(SRC)}:{number}"
        for path in sorted((SRC / PACKAGE).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if phrase in line
    ]
    assert not found, f"{phrase!r} in {found}"
