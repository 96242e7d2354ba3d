"""The package's shape: its modules import each other without a cycle at import time (the
checker make lint runs on core, pointed at shardrec_dlrm), and the command line loads without
torch, so that ``dlrm --help`` answers at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_no_import_cycles() -> None:
    checker = REPO / "tools" / "check_import_cycles.py"
    source = REPO / "packages" / "dlrm" / "src"
    done = subprocess.run(
        [sys.executable, str(checker), str(source), "--top", "shardrec_dlrm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_command_line_loads_without_torch() -> None:
    probe = "import sys, shardrec_dlrm.cli; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
