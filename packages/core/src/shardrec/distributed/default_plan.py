"""A simple rule-based plan, for a quick plan without the planner (DistributedModelParallel asks the
planner when it is given no plan; this rule is what it used before the planner existed).

The rule, deterministic and size-aware, table by table in model order:

- one rank: every table table-wise on rank 0;
- a table bigger than an even share of all tables' bytes (total / world size) is row-wise, when a
  sharder offers row-wise for its module;
- every other table is table-wise, placed on the rank with the fewest bytes so far (largest
  tables first, ties to the lowest rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shardrec.distributed.sharder_index import SharderIndex
from shardrec.distributed.sharding_plan import (
    column_wise,
    data_parallel,
    row_wise,
    shardable_modules,
    table_shapes,
    table_wise,
)
from shardrec.distributed.types import (
    ModuleSharder,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
    ShardingType,
)

__all__ = ["column_wise", "data_parallel", "default_plan", "row_wise", "table_wise"]


def default_plan(
    module: nn.Module,
    sharders: Sequence[ModuleSharder],
    env: ShardingEnv,
    device: torch.device,
) -> ShardingPlan:
    """The plan described in this module's docstring."""
    world = env.world_size
    entries: list[tuple[str, str, int, int, int, set[str]]] = []
    index = SharderIndex.of(sharders)
    for fqn, sub in shardable_modules(module, index):
        offered = set(index.offered(type(sub), device.type))
        for table, (rows, cols, nbytes) in table_shapes(sub).items():
            entries.append((fqn, table, rows, cols, nbytes, offered))
    plan: dict[str, dict[str, ParameterSharding]] = {}
    total = sum(e[4] for e in entries)
    load = [0] * world
    chosen: dict[tuple[str, str], ParameterSharding] = {}
    order = sorted(range(len(entries)), key=lambda i: (-entries[i][4], i))
    for i in order:
        fqn, table, rows, cols, nbytes, offered = entries[i]
        if (
            world > 1
            and ShardingType.ROW_WISE in offered
            and nbytes * world > total
            and rows >= world
        ):
            chosen[(fqn, table)] = row_wise(rows, cols, world)
            for r in range(world):
                load[r] += nbytes // world
        elif ShardingType.TABLE_WISE in offered:
            rank = min(range(world), key=lambda r: (load[r], r))
            load[rank] += nbytes
            chosen[(fqn, table)] = table_wise(rank, rows, cols)
        elif ShardingType.DATA_PARALLEL in offered:
            chosen[(fqn, table)] = data_parallel(rows, cols, world)
        else:
            raise ValueError(
                f"default plan: no sharder offers table_wise, row_wise or data_parallel for table"
                f" {table!r} of {fqn or '<root>'} on {device.type}; pass a plan"
            )
    for fqn, table, *_ in entries:
        plan.setdefault(fqn, {})[table] = chosen[(fqn, table)]
    return ShardingPlan(plan)
