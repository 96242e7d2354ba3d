"""Testing kit for sharders: run a case on several gloo processes, and check a sharder or a plan
against the unsharded module.

::

    from shardrec.testing import EmbeddingModel, WorkerPool, check_sharding

    model = EmbeddingModel(tables=[EmbeddingBagConfig(name="t0", ...), ...],
                           fused_params={"optimizer": "rowwise_adagrad", "learning_rate": 0.05})
    with WorkerPool(4) as pool:
        check_sharding(model, sharding_type="my_type", world_size=2, reload_world_size=3,
                       pool=pool)

Importing this package does no work (its names are imported on first use, and the workers start
on the first ``run``). The pytest fixture lives in :mod:`shardrec.testing.pytest_plugin`; pytest is
not needed otherwise.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # mypy sees each lazy name as what it is; at run time __getattr__ imports it on first use.
    from shardrec.testing._allocations import Allocation, record_allocations
    from shardrec.testing._batches import Batches, GlobalBatch
    from shardrec.testing._check import PlanForWorld, check_sharding
    from shardrec.testing._errors import RankFailedError, RankTimeoutError
    from shardrec.testing._model import EMBEDDING_FQN, EmbeddingModel, HeadModel
    from shardrec.testing._pool import WorkerPool, run_ranks
    from shardrec.testing._ranks import DenseOptimizer
    from shardrec.testing._report import EquivalenceError, EquivalenceReport, Mismatch

_LAZY: dict[str, str] = {
    "EMBEDDING_FQN": "shardrec.testing._model",
    "Allocation": "shardrec.testing._allocations",
    "Batches": "shardrec.testing._batches",
    "DenseOptimizer": "shardrec.testing._ranks",
    "EmbeddingModel": "shardrec.testing._model",
    "EquivalenceError": "shardrec.testing._report",
    "EquivalenceReport": "shardrec.testing._report",
    "GlobalBatch": "shardrec.testing._batches",
    "HeadModel": "shardrec.testing._model",
    "Mismatch": "shardrec.testing._report",
    "PlanForWorld": "shardrec.testing._check",
    "RankFailedError": "shardrec.testing._errors",
    "RankTimeoutError": "shardrec.testing._errors",
    "WorkerPool": "shardrec.testing._pool",
    "check_sharding": "shardrec.testing._check",
    "record_allocations": "shardrec.testing._allocations",
    "run_ranks": "shardrec.testing._pool",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shardrec.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "EMBEDDING_FQN",
    "Allocation",
    "Batches",
    "DenseOptimizer",
    "EmbeddingModel",
    "EquivalenceError",
    "EquivalenceReport",
    "GlobalBatch",
    "HeadModel",
    "Mismatch",
    "PlanForWorld",
    "RankFailedError",
    "RankTimeoutError",
    "WorkerPool",
    "check_sharding",
    "record_allocations",
    "run_ranks",
]
