"""tools/check_import_cycles.py: core has no import cycle, and a planted one fails."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_import_cycles.py"


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_import_cycles", TOOL)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _package(root: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` under ``root`` with the given module sources (``__init__`` files made)."""
    for name, source in files.items():
        path = root.joinpath("pkg", *name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in (path.parent, *path.parent.parents):
            if parent == root:
                break
            (parent / "__init__.py").touch()
        path.write_text(source, encoding="utf-8")
    return root


def test_core_has_no_import_cycle(tool: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool.main([]) == 0, capsys.readouterr().out


def test_a_planted_cycle_fails_and_is_named(
    tool: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _package(
        tmp_path,
        {
            "a.py": "from pkg.b import thing\n",
            "b.py": "from pkg import c\nthing = 1\n",
            "c.py": "import pkg.a\n",
            "d.py": "from pkg.a import thing\n",  # on the way in, not on the cycle
        },
    )
    assert tool.main([str(root), "--top", "pkg"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["import cycle: pkg.a -> pkg.b -> pkg.c -> pkg.a"]


def test_a_relative_import_through_a_package_init_is_a_cycle(
    tool: ModuleType, tmp_path: Path
) -> None:
    # The shape core had: a package's __init__ imports a module that imports a sibling of the
    # package, which imports something of the package (so runs its __init__ first).
    root = _package(
        tmp_path,
        {
            "kernels/__init__.py": "from .table import Table\n",
            "kernels/table.py": "from .. import ops\n",
            "kernels/specs.py": "X = 1\n",
            "ops.py": "from pkg.kernels.specs import X\n",
        },
    )
    cycles = tool.find_cycles(tool.import_graph(root, "pkg"))
    assert cycles == [["pkg.kernels", "pkg.kernels.table", "pkg.ops", "pkg.kernels"]]


def test_imports_that_do_not_run_at_import_time_are_not_edges(
    tool: ModuleType, tmp_path: Path
) -> None:
    root = _package(
        tmp_path,
        {
            "a.py": (
                "from typing import TYPE_CHECKING\n"
                "import typing\n"
                "from pkg import b\n"
                "if TYPE_CHECKING:\n"
                "    from pkg import c\n"
                "if typing.TYPE_CHECKING:\n"
                "    import pkg.c\n"
            ),
            "b.py": "def late():\n    from pkg import a\n\nclass K:\n    def m(self):\n"
            "        import pkg.a\n",
            "c.py": "import pkg.a\n",
        },
    )
    graph = tool.import_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == set()
    assert graph["pkg.c"] == {"pkg.a"}
    assert tool.find_cycles(graph) == []


def test_class_bodies_and_try_blocks_run_at_import_time(tool: ModuleType, tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "a.py": "try:\n    from pkg import b\nexcept ImportError:\n    b = None\n",
            "b.py": "class K:\n    from pkg import a\n",
        },
    )
    assert tool.find_cycles(tool.import_graph(root, "pkg")) == [["pkg.a", "pkg.b", "pkg.a"]]
