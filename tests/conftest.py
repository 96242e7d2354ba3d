"""Shared test set-up.

``SHARDREC_HIDE_FBGEMM=1`` hides FBGEMM from the interpreter (a meta-path blocker installed before
any test module is imported), so that the pure-torch paths can be tested where FBGEMM is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from shardrec.testing import WorkerPool


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


@pytest.fixture(scope="session")
def dist_pool() -> Iterator[WorkerPool]:
    """Four gloo workers shared by every multi-process test (shardrec.testing's pool); they run
    this file first, so that SHARDREC_HIDE_FBGEMM hides FBGEMM from them too."""
    from shardrec.testing import WorkerPool  # here: the hook above comes before shardrec

    with WorkerPool(4, preload=[__file__]) as pool:
        yield pool
