"""tools/check_private_imports.py: the tree passes, and each kind of private import fails."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_private_imports.py"


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_private_imports", TOOL)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_tree_has_no_private_imports_across_packages(
    tool: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tool.main([]) == 0, capsys.readouterr().out


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("from shardrec.modules._routing import FeatureRouter", "private module"),
        ("import shardrec.modules._routing", "private module"),
        ("from shardrec.sparse import _regroup", "private name '_regroup'"),
        ("from shardrec.distributed.types import shard_ranks", "not in the __all__"),
    ],
)
def test_a_planted_private_import_fails(
    tool: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    source: str,
    reason: str,
) -> None:
    planted = tmp_path / "plugin.py"
    planted.write_text(f"{source}\n", encoding="utf-8")
    assert tool.main([str(planted)]) == 1
    out = capsys.readouterr().out
    assert "plugin.py:1:" in out
    assert reason in out


def test_public_imports_pass(tool: ModuleType, tmp_path: Path) -> None:
    planted = tmp_path / "plugin.py"
    planted.write_text(
        "from shardrec.distributed import comm\n"
        "from shardrec.distributed.sharding import FeatureRouter, ShardRect\n"
        "from shardrec.kernels import TableBatchedEmbedding\n"
        "from . import _sibling\n",
        encoding="utf-8",
    )
    assert tool.main([str(planted)]) == 0


def test_core_imports_neither_other_package(tool: ModuleType) -> None:
    assert "must not import" in tool.check_import("shardrec", "shardrec_sharders.plugin", None)
    # Inside a package its private modules are its own business.
    assert tool.check_import("shardrec", "shardrec.modules._routing", None) is None
