"""Every Python block in README.md and docs/ runs as written (see ``_blocks`` for the two markers).

Each page's blocks run in order as one script, in a fresh interpreter in an empty directory, so a
page may build on its own earlier blocks but on nothing the tests set up. README's quick start runs
under torchrun on two processes, as the README tells its reader to run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._blocks import Block, blocks

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
TIMEOUT_S = 300


def _python_blocks(page: Path) -> list[Block]:
    return [block for block in blocks(page) if block.language == "python"]


def _script(page: Path) -> str:
    parts = []
    for block in _python_blocks(page):
        if block.fragment_reason is not None:
            continue
        parts.append(f"# --- {block.where} (setup)\n{block.setup}" if block.setup else "")
        parts.append(f"# --- {block.where}\n{block.code}")
    return "".join(parts)


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error::DeprecationWarning"}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def _assert_ran(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, f"{what} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_python_block_runs_or_says_why_not(page: Path) -> None:
    for block in _python_blocks(page):
        assert block.fragment_reason != "", f"{block.where}: a fragment marker needs its reason"


def test_readme_quick_start_runs_on_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(_script(REPO / "README.md"))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # Run once: a process that destroyed its group exits 0 (tests/core/distributed/
    # test_exit_clean.py checks that no gloo group outlives destroy_process_group).
    result = _run([*argv, str(script)], tmp_path)
    _assert_ran(result, "README's quick start")
    # Both the unsharded and the sharded lookups print their shape, on each of the two ranks.
    assert result.stdout.count("torch.Size([3, 128])") == 4, result.stdout


@pytest.mark.parametrize(
    "page",
    [page for page in PAGES if page.name != "README.md" and _script(page)],
    ids=lambda page: page.name,
)
def test_page_runs(page: Path, tmp_path: Path) -> None:
    script = tmp_path / f"{page.stem}.py"
    script.write_text(_script(page))
    _assert_ran(_run([sys.executable, str(script)], tmp_path), f"the Python blocks of {page.name}")


def test_torchrec_intro_example_runs(tmp_path: Path) -> None:
    result = _run([sys.executable, str(REPO / "docs" / "examples" / "intro.py")], tmp_path)
    _assert_ran(result, "docs/examples/intro.py")
    assert "KeyedTensor" in result.stdout or "tensor(" in result.stdout, result.stdout
