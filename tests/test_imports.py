"""scprint's modules import one another in one direction: no two modules, and no two parts
of the package (data, embeddings, model, trainer, ...), import each other, counting the
imports inside functions too (a deferred import hides a circle, it does not remove it)."""

from __future__ import annotations

import ast

from conftest import REPO


def imports() -> dict[str, set[str]]:
    """Module -> the scprint modules it imports anywhere in its source."""
    files = {}
    for path in (REPO / "scprint").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in files.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                named |= {a.name for a in node.names}
        graph[module] = {n for n in named if n in files and n != module}
    return graph


def part(module: str) -> str:
    """scprint.model.readout -> scprint.model; top-level modules are parts of their own."""
    return ".".join(module.split(".")[:2])


def a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its nodes in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_a_cycle_finds_a_circle_and_only_one():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_two_modules_import_each_other():
    assert a_cycle(imports()) is None


def test_no_two_parts_of_the_package_import_each_other():
    parts: dict[str, set[str]] = {}
    for module, targets in imports().items():
        parts.setdefault(part(module), set()).update(
            part(t) for t in targets if part(t) != part(module)
        )
    assert a_cycle(parts) is None
