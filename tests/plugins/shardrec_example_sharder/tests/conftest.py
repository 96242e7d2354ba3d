"""What a plugin's own suite gets from ``pytest_plugins = ["shardrec.testing.pytest_plugin"]`` in
its root conftest: the ``shardrec_workers`` pool. Here, inside shardrec's suite, the example is not
installed, so this fixture first pip-installs it into a folder of its own, which this process and
the workers import from (for this module's tests only: the other tests must not see the plugin).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardrec.testing import WorkerPool

EXAMPLE = Path(__file__).resolve().parents[1]
SUITE_CONFTEST = EXAMPLE.parents[1] / "conftest.py"


@pytest.fixture(scope="module")
def shardrec_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    tmp = tmp_path_factory.mktemp("example")
    source = tmp / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "tests"))
    site = str(tmp / "site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", site, str(source)],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, site)
    path = os.pathsep.join(p for p in [site, os.environ.get("PYTHONPATH", "")] if p)
    try:
        with WorkerPool(2, env={"PYTHONPATH": path}, preload=[SUITE_CONFTEST]) as pool:
            yield pool
    finally:
        sys.path.remove(site)
