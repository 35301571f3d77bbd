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
    checkpoint, download = f"{PACKAGE}.model.checkpoint", f"{PACKAGE}.base.download"
    assert checkpoint not in _all_imports(download, modules[download], known)


@pytest.mark.parametrize("source", ["import os\n", "from selfflow import cli\n"])
def test_the_import_reader_sees_module_level_imports(tmp_path: Path, source: str) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source + "def f():\n    import selfflow.model.network\n", encoding="utf-8")
    found = _module_level_imports(
        "selfflow.probe", path, {"selfflow.cli", "selfflow.model.network"}
    )
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


# ----------------------------------------------------------------------------------------------
# Rooms: no two modules lean on each other, and a shared concern lives in the base


def _dependencies(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere: at load time, inside functions and
    for type hints alone (``if TYPE_CHECKING:``). A module that needs another's types, or
    imports it late to dodge a load-time loop, depends on it all the same."""
    known = set(modules)
    return {
        name: {t for t in _all_imports(name, path, known) if t not in _parents(name)}
        for name, path in modules.items()
    }


def _mutual_groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of two or more nodes that all reach each other (the graph's cycles)."""
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for target in graph.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        reach[start] = seen
    groups = {
        tuple(sorted({node} | {other for other in reach[node] if node in reach[other]}))
        for node in graph
    }
    return sorted(list(group) for group in groups if len(group) > 1)


def test_mutual_groups_finds_every_cycle_and_nothing_else() -> None:
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": set(), "e": {"f"}, "f": {"g"}}
    graph["g"] = {"e"}
    assert _mutual_groups(graph) == [["a", "b"], ["e", "f", "g"]]
    assert _mutual_groups({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_dependency_reader_sees_late_and_type_only_imports(tmp_path: Path) -> None:
    """The trainer <-> watch pattern: one side imports the other inside a function, the other
    imports the first for a type hint only. Neither is a load-time import, yet it is a loop."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "trainer.py").write_text(
        "def run():\n    from pkg.watch import Watch\n", encoding="utf-8"
    )
    (package / "watch.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.trainer import T\n",
        encoding="utf-8",
    )
    modules = {"pkg": package / "__init__.py"}
    modules |= {f"pkg.{n}": package / f"{n}.py" for n in ("trainer", "watch")}
    assert _mutual_groups(_dependencies(modules)) == [["pkg.trainer", "pkg.watch"]]


def test_no_two_modules_depend_on_each_other_even_late_or_for_types() -> None:
    groups = _mutual_groups(_dependencies(_modules()))
    assert not groups, "modules that depend on each other: " + "; ".join(
        " <-> ".join(group) for group in groups
    )


def _rooms() -> set[str]:
    """The package's sub-packages (``batch``, ``data``, ...): each one owns one job."""
    return {
        path.parent.name
        for path in (SRC / PACKAGE).glob("*/__init__.py")
        if path.parent.name != "__pycache__"
    }


def _room(name: str) -> str | None:
    """The room a module belongs to (``selfflow.data.prepare`` -> ``data``), None for the base."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (SRC / PACKAGE / parts[-1]).is_dir() else None


# Which rooms each room may use: the way data flows, bottom to top. The base (files, locks,
# seeds, processes, downloads) is below everything; the model (network, checkpoints, card, VAE)
# stands on it; the sampler side drives a model. The jobs come above: the evaluator needs only
# the base; data preparation encodes with the model's VAE; the FID batch runs the sampler and
# scores itself with the evaluator; training reads the data and runs the FID batch.
ROOM_USES = {
    "base": set(),
    "model": {"base"},
    "sampling": {"base", "model"},
    "eval": {"base"},
    "data": {"base", "model"},
    "batch": {"base", "model", "sampling", "eval"},
    "train": {"base", "model", "sampling", "batch", "data"},
    # The research loop (sweep, probe) calls the jobs' public functions; no job calls it.
    "research": {"base", "model", "sampling", "eval", "data", "batch", "train"},
}
# What a room offers the others. The three library rooms (base, model, sampling) offer every
# module: they exist to be called. A job room offers its face (``__init__``) and the entry
# points named here. A concern two rooms share (a folder lock, a float32 switch, the version)
# is no job room's to offer: it lives in the base.
EVERYTHING = None
ROOM_OFFERS: dict[str, set[str] | None] = {
    "base": EVERYTHING,
    "model": EVERYTHING,
    "sampling": EVERYTHING,
    "batch": {"selfflow.batch", "selfflow.batch.cli"},  # `sweep` takes every `sample` option
    "data": {"selfflow.data", "selfflow.data.verify"},
    "eval": {"selfflow.eval", "selfflow.eval.evaluator"},
    "train": {"selfflow.train", "selfflow.train.demo"},  # the demo: research builds on it
    "research": {"selfflow.research"},
}


def test_every_room_has_its_place_in_the_flow() -> None:
    assert _rooms() == set(ROOM_USES) == set(ROOM_OFFERS), (
        "a new sub-package: say which rooms it uses and what it offers (ROOM_USES, ROOM_OFFERS)"
    )


def _room_crossings() -> list[tuple[str, str, str, str]]:
    """(importer, its room, imported module, its room) for every import from room to room."""
    found = []
    for name, targets in _dependencies(_modules()).items():
        for target in targets:
            mine, theirs = _room(name), _room(target)
            if mine and theirs and mine != theirs:
                found.append((name, mine, target, theirs))
    return sorted(found)


def test_a_room_uses_only_the_rooms_its_data_flows_to() -> None:
    """``data/`` took its folder lock from ``batch/`` and its float32 switch from ``eval/``."""
    wrong = [
        f"{name} -> {target}"
        for name, mine, target, theirs in _room_crossings()
        if theirs not in ROOM_USES[mine]
    ]
    assert not wrong, f"rooms that reach into a room they do not use: {wrong}"


def test_a_room_takes_from_another_only_what_that_room_offers() -> None:
    """The trainer took its folder lock from ``batch/lock.py``: a shared concern in a sibling."""
    wrong = [
        f"{name} -> {target}"
        for name, _, target, theirs in _room_crossings()
        if ROOM_OFFERS[theirs] is not EVERYTHING and target not in ROOM_OFFERS[theirs]
    ]
    assert not wrong, (
        f"imports of another room's internals (move a shared concern to the base): {wrong}"
    )


def test_the_top_level_holds_only_the_face_and_the_commands() -> None:
    """Every other module lives in a room whose name says what it is for: the 23 modules that
    once stood side by side at the top did not show which were the sampler's and which the
    base's."""
    command_line = {PACKAGE, f"{PACKAGE}.options"}  # the face, and options commands share
    loose = [
        name
        for name in _modules()
        if _room(name) is None and name not in command_line
        if not _is_cli(name)
    ]
    assert not loose, f"modules at the top of the package that belong in a room: {loose}"


def test_the_base_imports_nothing_above_it() -> None:
    """The base is below every room: rooms call it, never the reverse."""
    wrong = [
        f"{name} -> {target}"
        for name, targets in _dependencies(_modules()).items()
        if _room(name) == "base"
        for target in targets
        if _room(target) != "base"
    ]
    assert not wrong, f"base modules that import something above the base: {wrong}"


def test_no_module_takes_a_name_from_the_package_face() -> None:
    """``selfflow/__init__`` is the users' entry point (the network, checkpoints, pipeline);
    the package's own modules import what they need from the module that owns it."""
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if name == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                wrong += [f"{name}: import {a.name}" for a in node.names if a.name == PACKAGE]
            elif isinstance(node, ast.ImportFrom) and node.module == PACKAGE and not node.level:
                wrong += [
                    f"{name}: from {PACKAGE} import {a.name}"
                    for a in node.names
                    if f"{PACKAGE}.{a.name}" not in modules
                ]
    assert not wrong, f"imports of the package face instead of the owning module: {wrong}"


def _defines_a_network(path: Path) -> bool:
    """Whether a module defines a ``torch.nn.Module`` subclass (directly)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if ast.unparse(base) in ("nn.Module", "torch.nn.Module", "Module"):
                    return True
    return False


def test_the_samplers_know_a_velocity_function_not_the_network() -> None:
    """``transport`` took the null label from the network's module; the caller now names it. Nothing
    the samplers import, directly or through others, defines a network."""
    modules = _modules()
    graph = _dependencies(modules)
    (samplers,) = [name for name in modules if name.rpartition(".")[2] == "transport"]
    seen, todo = set(), [samplers]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    networks = sorted(name for name in seen if _defines_a_network(modules[name]))
    assert any(_defines_a_network(path) for path in modules.values())  # the probe works
    assert not networks, f"the samplers reach modules that define a network: {networks}"


def test_the_documented_import_paths_survive_the_regrouping() -> None:
    """What the README and docs/api.md show users, as they show it."""
    import importlib

    import selfflow

    for name in ("load_model", "save_model", "SelfFlowPipeline", "SelfFlowDiT", "ModelConfig"):
        assert callable(getattr(selfflow, name)), name
    assert callable(importlib.import_module("selfflow.batch").generate_fid_batch)
    assert importlib.import_module("selfflow.batch").BatchConfig
    data = importlib.import_module("selfflow.data")
    assert callable(data.write_dataset) and data.LatentDataset
    for module in ("selfflow.cli", "selfflow.train.demo", "selfflow.train"):
        assert importlib.import_module(module)
    assert callable(importlib.import_module("selfflow.cli").main)
