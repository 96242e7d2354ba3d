"""The plan DistributedModelParallel makes when given none: the planner on the live topology."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shardrec.distributed.planner.planner import EmbeddingShardingPlanner
from shardrec.distributed.planner.report import PlanReport
from shardrec.distributed.planner.topology import Topology, local_world_size_from_env
from shardrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan


def live_topology(env: ShardingEnv, device: torch.device) -> Topology:
    """``env``'s ranks on ``device``: ranks per host from ``LOCAL_WORLD_SIZE`` (torchrun sets it),
    device memory from the device itself when it is a GPU."""
    local = local_world_size_from_env(env.world_size)
    hbm: int | None = None
    if device.type == "cuda" and torch.cuda.is_available():
        hbm = int(torch.cuda.get_device_properties(device).total_memory)
    return Topology(
        world_size=env.world_size,
        compute_device="cpu" if device.type == "meta" else device.type,
        local_world_size=local,
        hbm_cap=hbm,
    )


def plan_with_report(
    module: nn.Module,
    sharders: Sequence[ModuleSharder],
    env: ShardingEnv,
    device: torch.device,
) -> tuple[ShardingPlan, PlanReport | None]:
    """Plan ``module`` for ``env`` (rank 0 plans and broadcasts when there is a process group)."""
    planner = EmbeddingShardingPlanner(live_topology(env, device))
    if env.pg is not None:
        plan = planner.collective_plan(module, sharders, env.pg)
    else:
        plan = planner.plan(module, sharders)
    return plan, planner.last_report
