"""``shardrec.testing`` is light to import: no pytest, its modules imported on first use."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_importing_the_kit_needs_no_pytest_and_does_no_work() -> None:
    script = textwrap.dedent(
        """
        import sys
        import shardrec.testing as kit
        assert not any(m.startswith("shardrec.testing.") for m in sys.modules), "eager imports"
        assert kit.check_sharding.__module__ == "shardrec.testing._check"
        assert kit.WorkerPool.__module__ == "shardrec.testing._pool"
        assert "pytest" not in sys.modules, "pytest imported"
        print(sorted(kit.__all__) == sorted(kit._LAZY))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
