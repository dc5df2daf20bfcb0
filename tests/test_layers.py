"""Layers import downward only: the import graph of harvest/, actors/, controller/ and workloads/.

Read from the source with `ast` (nothing is imported), counting lazy imports inside
functions too, but not those under `if TYPE_CHECKING:`, which never run. The layers, from
the bottom: the library (every module of `harvest` but the entry points), the roles
(actors/, controller/), then the entry points (the CLI, the Serve app builder, the
service wiring, `__main__` modules) and the workloads, which may import everything below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harvest", "actors", "controller", "workloads")
ROLES = ("actors", "controller")
ENTRY_POINTS = ("harvest.cli", "harvest.deploy", "harvest.service")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (imports for annotations only)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imported(name: str, path: Path) -> set[str]:
    """The modules of PACKAGES that module `name` imports (a package counts as its __init__)."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    targets = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the package of `name`
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                module = ".".join(package[: len(package) - node.level + 1] + ([module] if module else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets += [
                f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names
            ]
    resolved = set()
    for target in targets:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


GRAPH = {name: _imported(name, path) for name, path in MODULES.items()}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _is_entry_point(module: str) -> bool:
    return _within(module, ENTRY_POINTS) or module.endswith(".__main__")


def _layer(module: str) -> str:
    if _is_entry_point(module) or _within(module, ("workloads",)):
        return "entry"
    return "role" if _within(module, ROLES) else "library"


def test_the_graph_sees_the_known_wiring():
    """The walk itself works: it finds imports the code is known to make, lazy ones included."""
    assert "harvest.cli.app" in GRAPH["harvest.cli.jobs"]
    assert "workloads.registry" in GRAPH["harvest.cli.jobs"]  # imported inside a function
    assert any(_within(t, ROLES) for t in GRAPH["harvest.service"])  # the wiring of the roles
    assert "harvest.queue.inputs" not in GRAPH["harvest.queue.errors"]  # under TYPE_CHECKING only


def test_the_library_imports_no_role_entry_point_or_workload():
    upward = {
        module: sorted(t for t in targets if _layer(t) != "library")
        for module, targets in GRAPH.items()
        if _layer(module) == "library"
    }
    assert {m: t for m, t in upward.items() if t} == {}


def test_the_roles_import_no_entry_point_or_workload():
    upward = {
        module: sorted(t for t in targets if _layer(t) == "entry")
        for module, targets in GRAPH.items()
        if _layer(module) == "role"
    }
    assert {m: t for m, t in upward.items() if t} == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_cli():
    cli = {
        m: {t for t in ts if _within(t, ("harvest.cli",))}
        for m, ts in GRAPH.items()
        if _within(m, ("harvest.cli",))
    }
    assert len(cli) >= 5 and _cycles(cli) == []


def test_no_import_cycles_anywhere():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("constant", ["NAMESPACE", "CONTROLLER_NAME"])
def test_the_ray_names_are_defined_once(constant):
    """Every role finds the others by these names: defined once, imported everywhere."""
    definitions = []
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == constant for t in targets):
                definitions.append(name)
    assert definitions == ["harvest.names"]
