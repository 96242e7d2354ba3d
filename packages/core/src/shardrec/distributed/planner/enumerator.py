"""Every way each table could be sharded, as offered by the discovered sharders and allowed by
constraints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import torch

from shardrec.distributed.planner.constraints import ParameterConstraints
from shardrec.distributed.planner.estimators import ShardEstimate, Workload, estimate_shard
from shardrec.distributed.planner.layouts import (
    COLUMN_ALIGNMENT,
    DEFAULT_MIN_COLUMN_PARTITION,
    Cut,
    ShardLayout,
    Traffic,
    builtin_layouts,
)
from shardrec.distributed.planner.topology import Topology
from shardrec.distributed.planner.types import PlannerError, PlannerTable, ShardingOption, ShardSpec
from shardrec.distributed.sharder_index import SharderIndex
from shardrec.distributed.sharding.contract import HasPlannerLayout
from shardrec.distributed.types import ModuleSharder, ShardingType
from shardrec.kernels.specs import OptimizerType
from shardrec.kernels.storage import IN_MEMORY, StorageMemory

# On equal estimates, the simpler layout wins: fewer collectives, fewer pieces.
_PREFERENCE: Final[dict[str, int]] = {
    ShardingType.TABLE_WISE: 0,
    ShardingType.ROW_WISE: 1,
    ShardingType.COLUMN_WISE: 2,
    ShardingType.DATA_PARALLEL: 3,
    ShardingType.TABLE_ROW_WISE: 4,
    ShardingType.TABLE_COLUMN_WISE: 5,
    ShardingType.GRID_SHARD: 6,
}


def _layout_for(sharder: ModuleSharder, sharding_type: str) -> tuple[ShardLayout, str]:
    if isinstance(sharder, HasPlannerLayout):
        layout = sharder.planner_layout(sharding_type)
        if layout is not None:
            if not isinstance(layout, ShardLayout):
                raise TypeError(
                    f"{type(sharder).__qualname__}.planner_layout({sharding_type!r}) returned "
                    f"{type(layout).__qualname__}, which has no "
                    "cuts(table, topology, min_partition)"
                )
            return layout, type(sharder).__qualname__
    builtin = builtin_layouts()
    if sharding_type in builtin:
        return builtin[sharding_type], "shardrec"
    return (
        _WholeTableLayout(),
        "shardrec (no layout from the plugin: priced as one whole-table shard)",
    )


class _WholeTableLayout:
    def cuts(self, table: PlannerTable, topology: Topology, min_partition: int) -> Sequence[Cut]:
        return [Cut(((0, 0, table.num_embeddings, table.embedding_dim),), Traffic.ALL_IDS, None)]


def sharders_by_type(
    sharders: Sequence[ModuleSharder], module_type: type, device: str
) -> dict[str, ModuleSharder]:
    """Sharding-type name -> the sharder that owns it for ``module_type`` (first registered
    wins), from the sharders' index (built here only when ``sharders`` is not one)."""
    return dict(SharderIndex.of(sharders).offered(module_type, device))


def _storage_kind(
    sharder: ModuleSharder, table: PlannerTable, kernel: str, topology: Topology
) -> str:
    """Where the sharder says this kernel keeps the table: the storage kind with most bytes."""
    probe = torch.empty((1, table.embedding_dim), device="meta")
    usage = sharder.storage_usage(probe, topology.compute_device, kernel)
    if not usage:
        return "hbm" if topology.uses_hbm else "ddr"
    kind = max(sorted(usage), key=lambda k: usage[k])
    return "hbm" if str(kind) == "hbm" else "ddr"


def enumerate_options(
    table: PlannerTable,
    sharders: Sequence[ModuleSharder],
    topology: Topology,
    workload: Workload,
    constraints: ParameterConstraints | None,
) -> list[ShardingOption]:
    """All candidate shardings of ``table``; raises PlannerError naming the table if there is
    none."""
    offered = sharders_by_type(sharders, table.module_type, topology.compute_device)
    if not offered:
        raise PlannerError(
            f"table {table.fqn!r}: no sharder for {table.module_type.__qualname__} on "
            f"{topology.compute_device!r} (the discovered sharders shard "
            f"{sorted({s.module_type.__qualname__ for s in sharders}) or 'nothing'})"
        )
    types = list(offered)
    if constraints is not None and constraints.sharding_types is not None:
        wanted = [str(t) for t in constraints.sharding_types]
        types = [t for t in wanted if t in offered]
        if not types:
            raise PlannerError(
                f"table {table.fqn!r}: constraint sharding_types={wanted} cannot be met: the "
                f"sharders for {table.module_type.__qualname__} on {topology.compute_device!r} "
                f"offer {list(offered)}"
            )
    min_partition = DEFAULT_MIN_COLUMN_PARTITION
    if constraints is not None and constraints.min_partition is not None:
        min_partition = constraints.min_partition

    options: list[ShardingOption] = []
    offered_kernels: dict[str, list[str]] = {}
    for st in types:
        sharder = offered[st]
        kernels = [str(k) for k in sharder.compute_kernels(st, topology.compute_device)]
        offered_kernels[st] = kernels
        if constraints is not None and constraints.compute_kernels is not None:
            allowed = {str(k) for k in constraints.compute_kernels}
            kernels = [k for k in kernels if k in allowed]
        layout, estimated_by = _layout_for(sharder, st)
        for kernel in kernels:
            kind = _storage_kind(sharder, table, kernel, topology)
            for cut in layout.cuts(table, topology, min_partition):
                groups = cut.groups()
                for g in sorted(set(groups)):
                    n = groups.count(g)
                    if n > topology.ranks_per_host:
                        raise PlannerError(
                            f"table {table.fqn!r}: the {st} layout ({estimated_by}) cut "
                            f"{n} pieces for one host of {topology.ranks_per_host} ranks"
                        )
                if len(set(groups)) > topology.world_size // topology.ranks_per_host:
                    continue  # more host groups than hosts: this cut cannot be placed
                shards = []
                # Pieces of one shape cost the same: estimate each shape once (row-wise and
                # data-parallel cut one piece per rank).
                estimates: dict[tuple[int, int], ShardEstimate] = {}
                for row_off, col_off, rows, cols in cut.pieces:
                    est = estimates.get((rows, cols))
                    if est is None:
                        est = estimate_shard(table, rows, cols, cut.traffic, topology, workload)
                        estimates[(rows, cols)] = est
                    shards.append(
                        ShardSpec(
                            row_off, col_off, rows, cols, est.storage, est.perf, cost=est.cost
                        )
                    )
                if cut.ranks is not None:
                    shards = [s.placed(r) for s, r in zip(shards, cut.ranks, strict=True)]
                options.append(
                    ShardingOption(
                        table=table,
                        sharding_type=st,
                        compute_kernel=kernel,
                        shards=tuple(shards),
                        fixed_ranks=cut.ranks is not None,
                        storage_kind=kind,
                        note=cut.note,
                        estimated_by=estimated_by,
                        host_groups=groups,
                    )
                )
    if not options:
        wanted_k = (
            list(constraints.compute_kernels) if constraints and constraints.compute_kernels else []
        )
        raise PlannerError(
            f"table {table.fqn!r}: constraint compute_kernels={wanted_k} cannot be met with "
            f"sharding types {types}: the sharders offer {offered_kernels} (column slices also "
            f"need embedding_dim {table.embedding_dim} >= 2 x min_partition {min_partition}, in "
            f"groups of {COLUMN_ALIGNMENT} columns where the dim is a multiple of "
            f"{COLUMN_ALIGNMENT}; grid also needs 2 hosts or more)"
        )
    # Cheapest total step time first; ties broken by name so every rank orders them the same way.
    options.sort(
        key=lambda o: (
            o.total_perf,
            o.max_shard_storage,
            _PREFERENCE.get(o.sharding_type, len(_PREFERENCE)),
            o.sharding_type,
            o.compute_kernel,
            len(o.shards),
        )
    )
    return options


def resolve_workload(
    table: PlannerTable,
    constraints: Mapping[str, ParameterConstraints],
    batch_size: int,
    optimizer: OptimizerType | None,
    memory: StorageMemory = IN_MEMORY,
) -> Workload:
    """``memory``: what the table's storage backend keeps in the rank's memory."""
    c = constraints.get(table.param_name) or constraints.get(table.fqn)
    own = table.optimizer if table.optimizer is not None else optimizer
    if c is None:
        return Workload(batch_size, 1.0, own, memory)
    chosen = c.optimizer if c.optimizer is not None else own
    return Workload(c.batch_size or batch_size, c.pooling_factor, chosen, memory)
