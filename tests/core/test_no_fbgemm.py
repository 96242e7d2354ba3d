"""The containers need no FBGEMM: their tests pass in a subprocess where fbgemm_gpu is hidden."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTAINER_TESTS = sorted(
    str(p)
    for pattern in (
        "test_jagged_tensor.py",
        "test_keyed_jagged_tensor.py",
        "test_keyed_tensor.py",
        "test_sparse_*.py",
    )
    for p in HERE.glob(pattern)
)

# Runs the container tests, then reports whether FBGEMM was loaded or importable in that process.
_RUNNER = """
import sys, pytest
rc = pytest.main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m == "fbgemm_gpu" or m.startswith("fbgemm_gpu."))
print("FBGEMM-LOADED", loaded)
try:
    import fbgemm_gpu  # noqa: F401
    print("FBGEMM-IMPORTABLE yes")
except ImportError:
    print("FBGEMM-IMPORTABLE no")
sys.exit(rc)
"""


def test_container_tests_pass_without_fbgemm() -> None:
    assert len(CONTAINER_TESTS) >= 4, CONTAINER_TESTS
    env = {**os.environ, "SHARDREC_HIDE_FBGEMM": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, "-q", "-p", "no:cacheprovider", *CONTAINER_TESTS],
        capture_output=True,
        text=True,
        env=env,
        cwd=HERE.parents[1],
        timeout=900,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert " passed" in output, output[-2000:]
    assert " failed" not in output, output[-2000:]
    assert "FBGEMM-LOADED []" in output, output[-2000:]
    assert "FBGEMM-IMPORTABLE no" in output, output[-2000:]
