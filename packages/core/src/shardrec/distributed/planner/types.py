"""The planner's own vocabulary: tables as it sees them, candidate shardings, and their costs."""

from __future__ import annotations

from dataclasses import dataclass, field


class PlannerError(ValueError):
    """The planner cannot produce a plan: infeasible memory or an unsatisfiable constraint."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TableSpec:
    """One shardable embedding table, in the words of the planner.

    ``module_path`` is the module's dotted path inside the model, ``param_name`` the table's name in
    that module's plan (the table name for embedding collections). ``num_features`` counts the
    features that look up this table; ``pooled`` is False for sequence (non-pooled) embeddings.
    ``optimizer`` is the fused optimizer the module trains it with (None: not known).
    """

    module_path: str
    param_name: str
    num_embeddings: int
    embedding_dim: int
    module_type: type
    element_size: int = 4
    num_features: int = 1
    pooled: bool = True
    optimizer: str | None = None  # the module's fused optimizer, if it names one

    @property
    def fqn(self) -> str:
        return f"{self.module_path}.{self.param_name}" if self.module_path else self.param_name


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One piece of a table: rows ``[row_offset, row_offset + rows)`` × columns ``[col_offset,
    ...)``.

    ``rank`` is None until the partitioner places it. ``storage`` is bytes, ``perf`` seconds per
    step.
    """

    row_offset: int
    col_offset: int
    rows: int
    cols: int
    storage: int
    perf: float
    rank: int | None = None

    def placed(self, rank: int) -> ShardSpec:
        return ShardSpec(
            self.row_offset, self.col_offset, self.rows, self.cols, self.storage, self.perf, rank
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardingOption:
    """One way to shard one table: a sharding type, a kernel, and the shards it cuts the table into.

    ``fixed_ranks`` is True when the layout itself decides each shard's rank (row-wise: shard i on
    rank i; data-parallel: a replica on every rank); otherwise the partitioner chooses.
    """

    table: TableSpec
    sharding_type: str
    compute_kernel: str
    shards: tuple[ShardSpec, ...]
    fixed_ranks: bool
    storage_kind: str  # "hbm" or "ddr"
    note: str = ""
    estimated_by: str = field(default="shardrec")

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
