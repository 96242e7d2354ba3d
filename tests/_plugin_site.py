"""Installing an example plugin of tests/plugins as a user would: pip, into a folder of its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PLUGINS = Path(__file__).resolve().parent / "plugins"


def install_plugin(distribution: Path, folder: Path) -> Path:
    """pip-install ``distribution`` into ``folder / "site"`` and return that folder (put it on
    ``sys.path`` or ``PYTHONPATH`` to use it). It is built from a copy, so the tree stays clean."""
    source = folder / "src"
    shutil.copytree(distribution, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = folder / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    subprocess.run([*pip, "--no-build-isolation", "--target", str(site), str(source)], check=True)
    return site
