"""The kit's pytest plugin as a plugin author enables it: ``pytest_plugins`` in a root conftest,
then the ``shardrec_workers`` fixture in a test (run here as its own pytest session; the pool's
``run`` is tested in test_workers.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CONFTEST = 'pytest_plugins = ["shardrec.testing.pytest_plugin"]\n'
TEST = textwrap.dedent(
    """
    from shardrec.testing import WorkerPool


    def test_the_fixture_is_a_pool_of_four(shardrec_workers):
        assert isinstance(shardrec_workers, WorkerPool)
        assert shardrec_workers.size == 4
        assert not shardrec_workers.started  # the workers start on the first run
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
