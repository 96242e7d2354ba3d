"""The kit's pytest plugin as a plugin author enables it: ``pytest_plugins`` in a root conftest,
then the ``shardrec_workers`` fixture in a test (run here as its own pytest session)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

CONFTEST = 'pytest_plugins = ["shardrec.testing.pytest_plugin"]\n'
TEST = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist


    def case(env):
        t = torch.tensor([env.rank + 1])
        dist.all_reduce(t, group=env.pg)
        return int(t)


    def test_two_ranks(shardrec_workers):
        assert shardrec_workers.size == 4
        assert shardrec_workers.run(2, case) == [3, 3]
    """
)


def test_a_plugin_suite_gets_the_shared_workers(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_mine.py").write_text(TEST)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
