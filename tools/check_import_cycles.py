"""Fails when core's modules import each other in a cycle.

The graph: one node per module of ``packages/core/src/shardrec``, an edge ``a -> b`` when ``a``
imports ``b`` while ``a`` itself is being imported. Only such imports count: an import inside a
function or method runs later, and one under ``if TYPE_CHECKING:`` never runs, so neither can
leave a module half-initialised. ``from pkg import name`` is an edge to ``pkg.name`` when that is
a module, else to ``pkg``; importing ``a.b.c`` also runs ``a`` and ``a.b`` (an edge to each
package on the way, as Python imports them first).

Usage: ``python tools/check_import_cycles.py [SOURCE_ROOT]`` (default: ``packages/core/src``, whose
top-level package is ``shardrec``). Exit status 1 and one line per cycle when any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT / "packages/core/src"
TOP = "shardrec"


def modules_of(source: Path, top: str = TOP) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package ``top`` under ``source``."""
    out: dict[str, Path] = {}
    for path in sorted((source / top).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(source).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_statements(body: Sequence[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of ``body`` that run when the module runs: not in a function or
    class method body, not under ``if TYPE_CHECKING:`` (its ``else:`` does run)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from import_time_statements(node.body)
            yield from import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from import_time_statements(block)
            for handler in node.handlers:
                yield from import_time_statements(handler.body)
        elif isinstance(node, ast.With):
            yield from import_time_statements(node.body)
        elif isinstance(node, ast.ClassDef):
            # A class body runs at import time; its methods' bodies do not.
            yield from import_time_statements(node.body)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _with_parents(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def edges_of(module: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The modules of ``known`` that ``module`` imports at import time (itself excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in import_time_statements(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.update(_with_parents(alias.name))
            continue
        base = _resolve(module, is_package, node)
        targets.update(_with_parents(base))
        for alias in node.names:
            if f"{base}.{alias.name}" in known:
                targets.add(f"{base}.{alias.name}")
    # A package's own parents are imported before it: not an edge of its own making.
    return {t for t in targets if t in known and t != module and not module.startswith(t + ".")}


def import_graph(source: Path, top: str = TOP) -> dict[str, set[str]]:
    known = modules_of(source, top)
    return {m: edges_of(m, p, known) for m, p in known.items()}


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle
    through its modules, listed from its smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(root: str) -> None:
        # Iterative, so a deep import chain cannot hit the recursion limit.
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
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
                    components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return [_one_cycle(graph, set(c), c[0]) for c in sorted(components)]


def _one_cycle(graph: Mapping[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside one component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--top", default=TOP, help="the top-level package under SOURCE")
    args = parser.parse_args(argv)
    cycles = find_cycles(import_graph(args.source, args.top))
    for cycle in cycles:
        print("import cycle: " + " -> ".join(cycle))
    if cycles:
        print(
            f"{len(cycles)} import cycle(s) at import time: move an import into the function that"
            " needs it, under `if TYPE_CHECKING:`, or move the shared code to its own module",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
