"""The house's structure: no import cycles, and each room imports only what its docstring allows.

Imports are read from the source with ``ast`` (imports inside functions included, ``if
TYPE_CHECKING:`` blocks left out: they never run), so a lazy import that closes a cycle is caught
as well as a module-level one.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package name (pyproject's package-dir)
SOURCES = {"qatgraph": "qatgraph", "passes": "qatgraph.passes", "backends": "qatgraph.backends"}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from (n for child in node.orelse for n in _import_nodes(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def _imports(name: str, path: Path) -> set[str]:
    """The qatgraph modules ``name`` imports (a package import counts as its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
        for candidate in candidates:
            # "from qatgraph.quant import quantizer" imports the module; "from x import name" imports x
            if candidate in MODULES and candidate != name:
                found.add(candidate)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _room(module: str) -> str:
    """``qatgraph.quant.quantizer`` -> ``qatgraph.quant``; top-level modules are rooms of their own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycle_between_modules():
    assert _cycles(GRAPH) == [], "import cycles (break them by moving shared code below both users)"


def test_no_import_cycle_between_rooms():
    """Rooms (subpackages and top-level modules) form layers; the package's __init__ (the public
    API, which imports every room) is left out."""
    rooms: dict[str, set[str]] = {}
    for module, imported in GRAPH.items():
        if module == "qatgraph":
            continue
        room = _room(module)
        rooms.setdefault(room, set()).update(_room(m) for m in imported if m != "qatgraph" and _room(m) != room)
    assert _cycles(rooms) == []


def _declared_rooms() -> dict[str, set[str]]:
    """room -> the rooms its ``__init__`` docstring's "May import" paragraph names."""
    declared = {}
    for name, path in MODULES.items():
        if path.name != "__init__.py" or name == "qatgraph":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        match = re.search(r"May import:?(.*?)(\n\n|$)", doc, flags=re.S)
        if match:
            declared[name] = {_room(m) for m in re.findall(r"qatgraph(?:\.[a-z_]+)+", match.group(1))}
    return declared


DECLARED = _declared_rooms()


def test_every_room_declares_what_it_may_import():
    rooms = {_room(name) for name, path in MODULES.items() if path.name == "__init__.py" and name.count(".") == 1}
    rooms -= {"qatgraph.demo"}  # the demo is a user of the public API, like an example
    assert rooms - set(DECLARED) == set(), "add a 'May import:' paragraph to these rooms' __init__ docstrings"


@pytest.mark.parametrize("room", sorted(DECLARED))
def test_room_imports_only_what_its_docstring_allows(room):
    allowed = DECLARED[room] | {room}
    wrong = {f"{module} -> {imported}" for module, imports in GRAPH.items() if _room(module) == room
             for imported in imports if _room(imported) not in allowed}
    assert wrong == set(), f"{room} may import {sorted(allowed)} (its __init__ docstring); fix the import or the doc"
