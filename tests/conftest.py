"""Shared test set-up.

``SHARDREC_HIDE_FBGEMM=1`` hides FBGEMM from the interpreter (a meta-path blocker installed before
any test module is imported), so that the pure-torch paths can be tested where FBGEMM is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType


class _HideFbgemm(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "fbgemm_gpu" or fullname.startswith("fbgemm_gpu."):
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (hidden by SHARDREC_HIDE_FBGEMM)"
            )
        return None


if os.environ.get("SHARDREC_HIDE_FBGEMM") == "1":
    sys.meta_path.insert(0, _HideFbgemm())
