"""Fails when one package imports another's private names.

shardrec's packages talk to each other through public API only: the built-in sharders
(``shardrec_sharders``), the ``dlrm`` application (``shardrec_dlrm``) and the example plugins
under ``tests/plugins`` may import from core (``shardrec``) only names of public modules, and
``shardrec_dlrm`` only public names of ``shardrec_sharders``; core imports neither of the others.

An import is private when a segment of its module path, or the name it imports, starts with
``_`` (dunders such as ``__version__`` are public). A name imported from a module that declares
``__all__`` must be listed there (or be a submodule): a module's ``__all__`` is its public API.
Imports inside a package (``shardrec`` importing ``shardrec._x``) are that package's business.

Usage: ``python tools/check_private_imports.py [PATH ...]`` (default: the files of
``packages/*/src`` and ``tests/plugins``). Exit status 1 and one line per violation when any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Top-level import name -> its source directory (where its modules' __all__ is read).
PACKAGES: dict[str, Path] = {
    "shardrec": ROOT / "packages/core/src/shardrec",
    "shardrec_sharders": ROOT / "packages/sharders/src/shardrec_sharders",
    "shardrec_dlrm": ROOT / "packages/dlrm/src/shardrec_dlrm",
}
# Packages a package may not import at all (core is the bottom layer).
FORBIDDEN: dict[str, frozenset[str]] = {
    "shardrec": frozenset({"shardrec_sharders", "shardrec_dlrm"}),
}
DEFAULT_PATHS = ("packages/core/src", "packages/sharders/src", "packages/dlrm/src", "tests/plugins")


@dataclass(frozen=True, slots=True)
class Violation:
    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        try:
            shown = self.path.relative_to(ROOT)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: {self.message}"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def owner_of(path: Path) -> str | None:
    """The first-party package ``path`` belongs to (None: a test, a tool, a third party)."""
    resolved = path.resolve()
    for name, source in PACKAGES.items():
        if resolved.is_relative_to(source):
            return name
    return None


def module_file(module: str) -> Path | None:
    """The source file of a first-party module (None: not first-party, or not found)."""
    top, *rest = module.split(".")
    source = PACKAGES.get(top)
    if source is None:
        return None
    base = source.joinpath(*rest)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@cache
def declared_all(module: str) -> frozenset[str] | None:
    """The names in a first-party module's literal ``__all__`` (None: it declares none)."""
    found = module_file(module)
    if found is None:
        return None
    tree = ast.parse(found.read_text(encoding="utf-8"), filename=str(found))
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        named = any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)
        if named and isinstance(value, ast.List | ast.Tuple):
            return frozenset(
                e.value
                for e in value.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return None


def imports_of(tree: ast.AST) -> Iterator[tuple[int, str, str | None]]:
    """``(line, module, name)`` for every absolute import (``name`` None for ``import m``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.lineno, node.module, alias.name


def check_import(owner: str | None, module: str, name: str | None) -> str | None:
    """Why importing ``name`` from ``module`` in a file of package ``owner`` is refused."""
    top = module.split(".")[0]
    if top not in PACKAGES or top == owner:
        return None
    if top in FORBIDDEN.get(owner or "", frozenset()):
        return f"{owner} must not import {top} (import of {module})"
    private = [s for s in module.split(".") if is_private(s)]
    if private:
        return f"private module {module!r} of {top} (segment {private[0]!r})"
    if name is None or name == "*":
        return None
    if is_private(name):
        return f"private name {name!r} from {module}"
    if name.startswith("__"):
        return None  # a dunder (``__version__``) is public
    public = declared_all(module)
    if public is not None and name not in public and module_file(f"{module}.{name}") is None:
        return f"{name!r} is not in the __all__ of {module}"
    return None


def check_file(path: Path) -> list[Violation]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    owner = owner_of(path)
    out = []
    for line, module, name in imports_of(tree):
        problem = check_import(owner, module, name)
        if problem is not None:
            out.append(Violation(path, line, problem))
    return out


def python_files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_file() and path.suffix == ".py":
            yield path
        elif path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="files or directories to check")
    args = parser.parse_args(argv)
    paths = args.paths or [ROOT / p for p in DEFAULT_PATHS]
    violations = [v for f in python_files(paths) for v in check_file(f)]
    for v in violations:
        print(v)
    if violations:
        print(f"{len(violations)} import(s) of private names across packages", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
