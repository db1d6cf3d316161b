"""The modules of ``lightning_ood`` import each other without a cycle (``data/`` had some;
``lightning_ood.load`` once imported the package root back).

Read with ``ast`` (nothing is imported): every ``import`` / ``from ... import`` of a
``lightning_ood`` module counts, wherever it stands (module level, inside a function,
under ``if TYPE_CHECKING:``), so a cycle cannot hide behind a lazy import either.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import lightning_ood

PACKAGE = "lightning_ood"
ROOT = Path(lightning_ood.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> Optional[str]:
    """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(name: str, modules: dict[str, Path]) -> Optional[str]:
    """The ``lightning_ood`` module that importing ``name`` loads (its longest known prefix)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``lightning_ood`` modules it imports (anywhere in its source)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(node, module, is_package)
                if source is None:
                    continue
                # ``from pkg import sub`` loads the submodule ``pkg.sub`` when there is one
                names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                         for alias in node.names]
            for name in names:
                target = _target(name, modules)
                if target is not None and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def test_graph_sees_the_package_modules():
    graph = import_graph()
    assert {f"{PACKAGE}.data.base", f"{PACKAGE}.data.ood", f"{PACKAGE}.deploy.load", f"{PACKAGE}.detectors.knn"} <= set(graph)
    assert f"{PACKAGE}.data.base" in graph[f"{PACKAGE}.data.digits"]  # DigitsDataModule subclasses OODDataModule
    assert f"{PACKAGE}.deploy.load" in graph[PACKAGE]  # lightning_ood.load, imported lazily: still counted


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle is not None:
        print("import cycle: " + " -> ".join(cycle))
        print("graph:\n" + "\n".join(f"  {m} -> {', '.join(sorted(t)) or '-'}" for m, t in sorted(graph.items())))
    assert cycle is None, f"import cycle in {PACKAGE}: {' -> '.join(cycle)}"
