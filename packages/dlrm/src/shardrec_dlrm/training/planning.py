"""Planning the sharding of the DLRM's tables: the planner, ``--sharding`` as a constraint, the
report."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import nn

from shardrec_dlrm.errors import UserError
from shardrec_dlrm.model.build import TABLE_NAMES
from shardrec_dlrm.training.config import ShardingName

if TYPE_CHECKING:
    from shardrec.distributed import ModuleSharder, ShardingPlan


@dataclass(frozen=True, slots=True)
class PlanRequest:
    world_size: int
    compute_device: str
    batch_size: int
    sharding: ShardingName
    optimizer: str
    local_world_size: int | None = None
    hbm_cap: int | None = None
    ddr_cap: int | None = None
    pooling_factors: tuple[float, ...] = ()  # ids per sample: one for every table, or one each


def discover_sharders() -> Sequence[ModuleSharder]:
    """The sharders of every installed plugin (``shardrec`` entry points)."""
    from shardrec.distributed.plugins import PluginError, load_sharder_registry

    try:
        sharders = load_sharder_registry().sharders()
    except PluginError as error:
        raise UserError(str(error)) from error
    if not sharders:
        raise UserError("no sharder plugins are installed (install shardrec-sharders)")
    return sharders


def plan_model(
    model: nn.Module,
    request: PlanRequest,
    sharders: Sequence[ModuleSharder],
    *,
    collective: bool = False,
) -> tuple[ShardingPlan, str]:
    """The plan of ``model``'s tables and the planner's report, as text.

    ``collective``: rank 0 plans and broadcasts (every rank of the default group must call).
    """
    from shardrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        PlannerError,
        Topology,
        format_report,
    )

    factors = request.pooling_factors or (1.0,)
    if len(factors) not in (1, len(TABLE_NAMES)):
        raise UserError(
            f"pooling factors: give one for every table or one per table ({len(TABLE_NAMES)}), "
            f"got {len(factors)}"
        )
    if len(factors) == 1:
        factors = factors * len(TABLE_NAMES)
    sharding_types = None if request.sharding == "auto" else [request.sharding]
    constraints = None
    if sharding_types is not None or request.pooling_factors:
        constraints = {
            name: ParameterConstraints(sharding_types=sharding_types, pooling_factor=float(factor))
            for name, factor in zip(TABLE_NAMES, factors, strict=True)
        }
    try:
        topology = Topology(
            world_size=request.world_size,
            compute_device=request.compute_device,
            local_world_size=request.local_world_size,
            hbm_cap=request.hbm_cap,
        )
        if request.ddr_cap is not None:
            topology = dataclasses.replace(topology, ddr_cap=request.ddr_cap)
        planner = EmbeddingShardingPlanner(
            topology,
            batch_size=request.batch_size,
            constraints=constraints,
            optimizer=request.optimizer,  # the planner knows each --optimizer by its name
        )
        if collective and dist.is_initialized():
            plan = planner.collective_plan(model, sharders)
        else:
            plan = planner.plan(model, sharders)
    except (PlannerError, ValueError) as error:
        raise UserError(str(error)) from error
    report = planner.last_report
    return plan, format_report(report) if report is not None else str(plan)
