"""What the two-level sharding tests (table-row-wise, table-column-wise, grid) share: 4 gloo
processes laid out as 2 nodes of 2, a small model, and plans written as shard rectangles.

Each check goes through ``shardrec.testing.check_sharding`` with ``local_world_size=2``, as
torchrun would set it on two machines of two processes.
"""

from __future__ import annotations

from typing import Any

from shardrec.distributed import ParameterSharding, ShardingPlan, ShardMetadata
from shardrec.testing import EmbeddingModel, EquivalenceReport, WorkerPool, check_sharding

from ._tables import SEQUENCE_DIM, table_model

WORLD, LOCAL = 4, 2
# t3 has one row: under row splits its only block is on one rank of its node.
TABLES = [
    ("t0", 7, 4, ["f0"]),
    ("t1", 10, 8, ["f1", "f2"]),
    ("t2", 9, 4, ["f2", "f3"]),
    ("t3", 1, 2, ["f4"]),
]
EC_DIM = SEQUENCE_DIM
LR = 0.05


def sharding(kind: str, boxes: list[tuple[int, int, int, int, int]]) -> ParameterSharding:
    """``boxes``: (row offset, col offset, rows, cols, rank) of each shard."""
    shards = tuple(ShardMetadata((r0, c0), (nr, nc), rank) for r0, c0, nr, nc, rank in boxes)
    return ParameterSharding(
        sharding_type=kind,
        compute_kernel="fused",
        ranks=tuple(s.rank for s in shards),
        shards=shards,
    )


def dims(kind: str) -> dict[str, tuple[int, int]]:
    """Table -> (rows, dim) as the model of ``kind`` ("ebc" or "ec") has it."""
    return {n: (r, d if kind == "ebc" else EC_DIM) for n, r, d, _ in TABLES}


def model(
    kind: str = "ebc", optimizer: str = "sgd", pooling: str = "SUM", weighted: bool = False
) -> EmbeddingModel:
    fused = {"optimizer": optimizer, "learning_rate": LR}
    return table_model(TABLES, kind, fused, pooling=pooling, weighted=weighted)


def check(
    pool: WorkerPool,
    plan: ShardingPlan,
    *,
    kind: str = "ebc",
    optimizer: str = "sgd",
    pooling: str = "SUM",
    weighted: bool = False,
    world: int = WORLD,
    local: int | None = LOCAL,
    reload_plan: ShardingPlan | None = None,
    **options: Any,
) -> EquivalenceReport:
    """``plan`` (over module ``emb``) on ``world`` processes, ``local`` per node (None: one
    node), against the unsharded module; with ``reload_plan``, saved and loaded under it."""
    return check_sharding(
        model(kind, optimizer, pooling, weighted),
        plan=lambda w: plan.plan["emb"],
        world_size=world,
        local_world_size=local,
        reload_world_size=None if reload_plan is None else WORLD,
        reload_plan=None if reload_plan is None else (lambda w: reload_plan.plan["emb"]),
        reload_local_world_size=LOCAL,
        pool=pool,
        **options,
    )
