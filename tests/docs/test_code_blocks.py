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


#: With torch 2.13 on gloo, a process that has finished its work and destroyed its process group
#: sometimes aborts as it exits ("terminate called without an active exception" from a gloo worker
#: thread that Python's finalisation stops). It happened as often at the previous release, and a
#: bare torch script that keeps ``dist.group.WORLD`` in a global after destroying it shows it too
#: (5 runs in 12 here); shardrec's part in it is not pinned down. The quick start is run again
#: only in that case, so any other failure, and the abort itself if it keeps recurring, still
#: fails the test.
EXIT_ABORT_ATTEMPTS = 3


def _aborted_after_finishing(result: subprocess.CompletedProcess[str]) -> bool:
    return (
        result.returncode != 0
        and "terminate called without an active exception" in result.stderr + result.stdout
        and result.stdout.count("torch.Size([3, 128])") == 4
        and "]: Traceback" not in result.stderr  # no rank raised (torchrun prefixes "[rankN]: ")
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
    for _ in range(EXIT_ABORT_ATTEMPTS):
        result = _run([*argv, str(script)], tmp_path)
        if not _aborted_after_finishing(result):
            break
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
