"""The package's shape: no import cycle in harness/, counting imports inside functions too (a lazy import only hides
a cycle), so that each module can be read, and tested, on top of the ones it names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "harness"


def imports_of(path: Path) -> set[str]:
    """The harness modules `path` imports anywhere in it (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("harness")):
            base = (node.module or "").removeprefix("harness").lstrip(".")
            if base:
                found.add(base.split(".")[0])
            else:  # from . import a, b
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("harness.")}
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_harness_has_no_import_cycle():
    graph = {p.stem: imports_of(p) - {p.stem} for p in PACKAGE.glob("*.py")}
    assert sum(map(len, graph.values())) > 20, "the graph was not read"
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(path[path.index(module) :] + [module])
        state[module] = "open"
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
