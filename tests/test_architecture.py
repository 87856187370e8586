"""The layering holds beyond what `lint-imports` checks (docs/architecture.md): no import loop anywhere in the
module graph (a package's modules and the package itself included), and imports inside functions stay rare and
each says why."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import tunelab

SOURCE = Path(tunelab.__file__).parent
MAX_SHARE_INSIDE_FUNCTIONS = 0.10


def import_loops(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return loops


def internal_imports(path: Path) -> list[tuple[ast.stmt, bool]]:
    """Each ``import tunelab...`` / ``from tunelab... import`` statement of a file, and whether it sits in a function."""
    found: list[tuple[ast.stmt, bool]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import) and any(a.name.split(".")[0] == "tunelab" for a in child.names):
                found.append((child, in_function))
            elif isinstance(child, ast.ImportFrom) and (child.level > 0 or (child.module or "").split(".")[0] == "tunelab"):
                found.append((child, in_function))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text(), str(path)), False)
    return found


def says_why(lines: list[str], statement: ast.stmt) -> bool:
    """A comment on the statement's lines or on the line just above it."""
    span = lines[statement.lineno - 1:statement.end_lineno]
    above = lines[statement.lineno - 2].strip() if statement.lineno > 1 else ""
    return any("#" in line for line in span) or above.startswith("#")


def test_no_import_loop_in_the_module_graph() -> None:
    graph = grimp.build_graph("tunelab", cache_dir=None)  # imports inside functions and under TYPE_CHECKING too
    assert import_loops(graph) == []


def test_few_imports_inside_functions_each_with_its_reason() -> None:
    total, inside, silent = 0, 0, []
    for path in sorted(SOURCE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for statement, in_function in internal_imports(path):
            total += 1
            if in_function:
                inside += 1
                if not says_why(lines, statement):
                    silent.append(f"{path.relative_to(SOURCE.parent)}:{statement.lineno}")
    assert total > 100  # the scan found tunelab's imports
    assert inside / total < MAX_SHARE_INSIDE_FUNCTIONS, f"{inside} of {total} tunelab imports sit inside functions"
    assert silent == [], "an import inside a function needs a comment saying why (an optional or heavy dependency, " \
                         "start-up time)"


def test_the_loop_finder_finds_a_loop() -> None:
    """Negative control: two modules importing each other are one loop; a chain is none."""
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    assert import_loops(graph) == []
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert import_loops(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
