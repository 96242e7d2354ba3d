"""The kit's pytest fixture. Enable it in your ``conftest.py``::

    pytest_plugins = ["shardrec.testing.pytest_plugin"]

then ask for ``shardrec_workers``: a :class:`~shardrec.testing.WorkerPool` of four gloo workers
shared by the whole session (started on first use, stopped at the end).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shardrec.testing._pool import WorkerPool

__all__ = ["shardrec_workers"]

POOL_SIZE = 4


@pytest.fixture(scope="session")
def shardrec_workers() -> Iterator[WorkerPool]:
    """Four gloo workers for ``pool.run(world_size, fn, **kwargs)`` and ``check_sharding``."""
    with WorkerPool(POOL_SIZE) as pool:
        yield pool
