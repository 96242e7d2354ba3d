"""The sharding planner: enumerate, estimate, partition, report.

``EmbeddingShardingPlanner(Topology(world_size=8, hbm_cap=80 * GB)).plan(model, sharders)`` returns
a ``ShardingPlan`` whose every shard has a rank; ``planner.last_report`` says per rank how full and
how busy it is, and per table why it got its sharding. The planner sees each table of the model as
a :class:`PlannerTable`. See docs/planner.md.
"""

from __future__ import annotations

import warnings

from shardrec.distributed.planner.constraints import ParameterConstraints
from shardrec.distributed.planner.estimators import OPTIMIZER_STATE, Workload, estimate_shard
from shardrec.distributed.planner.for_dmp import live_topology, plan_with_report
from shardrec.distributed.planner.layouts import Cut, ShardLayout, Traffic
from shardrec.distributed.planner.planner import EmbeddingShardingPlanner, to_sharding_plan
from shardrec.distributed.planner.rank_model import RankLoad
from shardrec.distributed.planner.rank_state import HasRankState, RankState
from shardrec.distributed.planner.report import PlanReport, format_report
from shardrec.distributed.planner.tables import tables_of
from shardrec.distributed.planner.topology import GB, Topology
from shardrec.distributed.planner.types import (
    PlannerError,
    PlannerTable,
    ShardCost,
    ShardingOption,
    ShardSpec,
)

__all__ = [
    "GB",
    "OPTIMIZER_STATE",
    "Cut",
    "EmbeddingShardingPlanner",
    "HasRankState",
    "ParameterConstraints",
    "PlanReport",
    "PlannerError",
    "PlannerTable",
    "RankLoad",
    "RankState",
    "ShardCost",
    "ShardLayout",
    "ShardSpec",
    "ShardingOption",
    "Topology",
    "Traffic",
    "Workload",
    "estimate_shard",
    "format_report",
    "live_topology",
    "plan_with_report",
    "tables_of",
    "to_sharding_plan",
]


def __getattr__(name: str) -> object:
    # The planner's table was called TableSpec, the name of the kernel's table too.
    if name == "TableSpec":
        warnings.warn(
            "shardrec.distributed.planner.TableSpec is renamed PlannerTable (the kernel's table is"
            " shardrec.kernels.TableSpec); the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return PlannerTable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
