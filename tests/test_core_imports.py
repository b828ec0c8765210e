"""The core's modules import one way (issue 9 item 8): no module imports one that imports it back.

Every import that runs counts, module-level and inside functions; ``if TYPE_CHECKING:`` blocks
never run and are left out (annotations may name a class of a module above).
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "cstoolkit"


def _executed_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    found: list[ast.ImportFrom | ast.Import] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit_one(other)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        visit(node)

    visit(tree)
    return found


def core_import_graph() -> dict[str, set[str]]:
    """module -> core modules it imports (``__init__`` for ``from . import <name>`` of a non-module)."""
    modules = {p.stem for p in CORE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(CORE.glob("*.py")):
        deps: set[str] = set()
        for node in _executed_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or (node.level == 0 and (node.module or "").startswith("cstoolkit")):
                    parts = (node.module or "").split(".")
                    module = parts[0] if node.level == 1 else (parts[1] if len(parts) > 1 else "")
                    if module:
                        deps.add(module)
                    else:
                        deps.update(a.name if a.name in modules else "__init__" for a in node.names)
            else:
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cstoolkit."))
        graph[path.stem] = {d for d in deps if d in modules and d != path.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = dfs(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_core_imports_have_no_cycle():
    graph = core_import_graph()
    assert {"api", "decomposition", "method", "recipe", "registry"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle in the core: " + " -> ".join(cycle or [])


def test_core_chain_points_down():
    graph = core_import_graph()
    # the bottom knows nothing of the layers above it
    for low in ("errors", "io", "config", "runtime", "backbone", "method", "registry", "lora", "cuda_graph"):
        assert not graph[low] & {"recipe", "decomposition", "combine", "api", "cli", "export"}, low
    assert "api" not in graph["decomposition"] and "api" not in graph["recipe"]


def test_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
