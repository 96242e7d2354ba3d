"""The planner's own vocabulary: tables as it sees them, candidate shardings, and their costs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Final

from shardrec.distributed.types import ShardRect
from shardrec.kernels.specs import OptimizerType, StorageChoice, parse_optimizer


class PlannerError(ValueError):
    """The planner cannot produce a plan: infeasible memory or an unsatisfiable constraint."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannerTable:
    """One shardable embedding table of a model, in the words of the planner.

    Not the kernel's :class:`shardrec.kernels.TableSpec` (one local table of a lookup, a shard
    included): this is the whole table as the model holds it, with what the planner prices it by.
    ``module_path`` is the module's dotted path inside the model, ``param_name`` the table's name in
    that module's plan (the table name for embedding collections). ``num_features`` counts the
    features that look up this table; ``pooled`` is False for sequence (non-pooled) embeddings.
    ``optimizer`` is the fused optimizer the module trains it with (None: the module names none,
    and the planner's ``optimizer`` is assumed); a name is parsed by
    :func:`shardrec.kernels.parse_optimizer`. ``storage``: the table's storage backend choice
    (None: a built-in backend); the planner asks that backend which of the table's bytes count
    against a rank's memory (:class:`shardrec.kernels.StorageMemory`).
    """

    module_path: str
    param_name: str
    num_embeddings: int
    embedding_dim: int
    module_type: type
    element_size: int = 4
    num_features: int = 1
    pooled: bool = True
    optimizer: OptimizerType | None = None
    storage: StorageChoice | None = None

    def __post_init__(self) -> None:
        if self.optimizer is not None:
            object.__setattr__(self, "optimizer", parse_optimizer(self.optimizer))

    @property
    def fqn(self) -> str:
        return f"{self.module_path}.{self.param_name}" if self.module_path else self.param_name


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardCost:
    """What one shard costs per step, split the way the per-rank model adds it up (see
    ``estimators.py`` for the formulas and ``rank_model.py`` for the sums).

    ``compute``: seconds of lookup, forward and backward, on the owner. ``read_bytes``: embedding
    bytes the owner reads per step (forward). ``to_owner`` / ``from_owner``: bytes each peer sends
    the owner (ids, output gradients) and receives from it (outputs). ``allreduce_intra`` /
    ``allreduce_inter``: bytes every rank sends for a replica's gradient, inside / between hosts.
    ``owner_intra``: bytes the owner also sends and receives inside its host (a reduction there).
    ``alone``: seconds of the shard alone on an idle rank (compute + the owner's traffic).
    ``collective_extra``: seconds the owner's outputs take beyond their bytes at the links'
    bandwidth, where they go by a collective slower per byte (a reduce-scatter, see
    ``Topology.reduce_scatter_bw``). ``sender_compute``: seconds every rank spends on the ids it
    sends this shard (a row split finds each id's owner: ``Topology.route_cost_per_id``) and on
    the pooled output it gets back (copied into the module's output:
    ``Topology.output_copy_cost_per_byte``). ``collectives``: how many collectives the shard's
    sharding issues per step, forward and backward; the tables of one module sharded alike share
    them, so the per-rank model counts them once per module and sharding type
    (``Topology.collective_latency`` each).
    """

    compute: float = 0.0
    read_bytes: float = 0.0
    to_owner: float = 0.0
    from_owner: float = 0.0
    allreduce_intra: float = 0.0
    allreduce_inter: float = 0.0
    owner_intra: float = 0.0
    alone: float = 0.0
    collective_extra: float = 0.0
    sender_compute: float = 0.0
    collectives: int = 0


NO_COST: Final = ShardCost()


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One piece of a table: rows ``[row_offset, row_offset + rows)`` × columns ``[col_offset,
    ...)``.

    ``rank`` is None until the partitioner places it. ``storage`` is bytes, ``perf`` seconds per
    step of the shard alone on an idle rank; ``cost`` splits that up for the per-rank model.
    """

    row_offset: int
    col_offset: int
    rows: int
    cols: int
    storage: int
    perf: float
    rank: int | None = None
    cost: ShardCost = NO_COST

    @property
    def rect(self) -> ShardRect:
        """The piece as the rectangle type the sharders and the checkpoints use."""
        return ShardRect(self.row_offset, self.col_offset, self.rows, self.cols)

    def placed(self, rank: int) -> ShardSpec:
        return ShardSpec(
            self.row_offset,
            self.col_offset,
            self.rows,
            self.cols,
            self.storage,
            self.perf,
            rank,
            self.cost,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardingOption:
    """One way to shard one table: a sharding type, a kernel, and the shards it cuts the table into.

    ``fixed_ranks`` is True when the layout itself decides each shard's rank (row-wise: shard i on
    rank i; data-parallel: a replica on every rank); otherwise the partitioner chooses. With
    ``host_groups`` (one group number per shard) it chooses a host for each group and puts the
    group's shards on distinct ranks of that host, never two shards of the table on one rank
    (table-row-wise and table-column-wise: one group; grid: a group per column slice).
    """

    table: PlannerTable
    sharding_type: str
    compute_kernel: str
    shards: tuple[ShardSpec, ...]
    fixed_ranks: bool
    storage_kind: str  # "hbm" or "ddr"
    note: str = ""
    estimated_by: str = field(default="shardrec")
    host_groups: tuple[int, ...] = ()

    @property
    def one_host(self) -> bool:
        """Whether the partitioner places the shards host by host (see ``host_groups``)."""
        return bool(self.host_groups)

    @property
    def total_perf(self) -> float:
        return sum(s.perf for s in self.shards)

    @property
    def total_storage(self) -> int:
        return sum(s.storage for s in self.shards)

    @property
    def max_shard_storage(self) -> int:
        return max(s.storage for s in self.shards)

    @property
    def max_shard_perf(self) -> float:
        return max(s.perf for s in self.shards)


def __getattr__(name: str) -> object:
    # The planner's table was called TableSpec, the name of the kernel's table too.
    if name == "TableSpec":
        warnings.warn(
            "shardrec.distributed.planner.types.TableSpec is renamed PlannerTable (the kernel's"
            " table is shardrec.kernels.TableSpec); the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return PlannerTable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
