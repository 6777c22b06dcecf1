"""The package's shape, checked from the source: layers import only downwards, no import
cycles (lazy imports inside functions included: they hide a cycle, they do not remove it) and
no module imports another module's private names.

Layers, bottom to top: ``zoo`` < ``training`` < ``export`` < ``serve`` < the application
(``ltzoo.cli``, ``ltzoo.demo``, ``ltzoo.cost``, ``ltzoo.net``, ``ltzoo.hub_server``).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

import ltzoo

PACKAGE_DIR = Path(ltzoo.__file__).resolve().parent
#: rank of each layer: a module may import modules of its own layer or of a lower rank
LAYER_RANK = {"zoo": 0, "training": 1, "export": 2, "serve": 3}
APPLICATION_RANK = 4


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    name: str | None  # for ``from target import name``
    line: int


def _module_files() -> dict[str, Path]:
    """Module name -> file, following the links ltzoo/{zoo,training,export,serve}."""
    files = {}
    for folder, _, names in os.walk(PACKAGE_DIR, followlinks=True):
        if "__pycache__" in folder:
            continue
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                parts = ["ltzoo", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
                files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = _module_files()


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports_of(module: str, path: Path) -> list[Import]:
    """Every import of ours in ``module``, at any depth, except under ``if TYPE_CHECKING``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    pending: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while pending:
        node = pending.pop()
        if _is_type_checking(node):
            continue
        pending.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:  # `from pkg import module`
                    found.append(Import(module, submodule, None, node.lineno))
                else:
                    found.append(Import(module, base, alias.name, node.lineno))
    return [i for i in found if i.target == "ltzoo" or i.target.startswith("ltzoo.")]


IMPORTS = [i for module, path in MODULES.items() for i in _imports_of(module, path)]


def _rank(module: str) -> int:
    parts = module.split(".")
    return LAYER_RANK.get(parts[1], APPLICATION_RANK) if len(parts) > 1 else APPLICATION_RANK


def test_the_walk_sees_every_layer():
    layers = {m.split(".")[1] for m in MODULES if m.count(".")}
    assert set(LAYER_RANK) <= layers, layers
    assert len(IMPORTS) > 50


def test_layers_import_only_downwards():
    upward = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in IMPORTS
        if i.target != "ltzoo" and _rank(i.target) > _rank(i.source)
    ]
    assert not upward, "\n".join(upward)


def test_zoo_imports_nothing_else_of_ours():
    outside = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in IMPORTS
        if i.source.startswith("ltzoo.zoo") and not i.target.startswith("ltzoo.zoo")
    ]
    assert not outside, "\n".join(outside)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_parent_package(target: str, source: str) -> bool:
    """``from . import x`` / ``from ..pkg import name`` reach the package's ``__init__``: that
    is how a module gets at its siblings, not a dependency on the package as a whole."""
    return source.startswith(target + ".")


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for i in IMPORTS:
        if i.target in MODULES and not _is_parent_package(i.target, i.source):
            graph.setdefault(i.source, set()).add(i.target)
    assert not _cycles(graph), _cycles(graph)


@pytest.mark.parametrize("graph_case", ["cycle", "chain"])
def test_cycle_finder_finds_cycles(graph_case):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"} if graph_case == "cycle" else set()}
    assert _cycles(graph) == ([["a", "b", "c"]] if graph_case == "cycle" else [])


def test_no_private_names_imported_across_modules():
    private = [
        f"{i.source}:{i.line} imports {i.target}.{i.name}"
        for i in IMPORTS
        if i.name
        and i.name.startswith("_")
        and not i.name.startswith("__")
        and i.target != i.source
    ]
    assert not private, "\n".join(private)
