"""``EmbeddingShardingPlanner``: from a model and the discovered sharders to a placed
``ShardingPlan``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
import torch.distributed as dist
from torch import nn

from shardrec.distributed.planner.constraints import ParameterConstraints
from shardrec.distributed.planner.enumerator import (
    enumerate_options,
    resolve_workload,
)
from shardrec.distributed.planner.partitioner import capacities
from shardrec.distributed.planner.proposer import search
from shardrec.distributed.planner.rank_state import (
    RankState,
    check_state_fits,
    describe_state,
    rank_state_of,
    state_kind,
    state_notes,
    state_per_rank,
)
from shardrec.distributed.planner.report import PlanReport, build_report
from shardrec.distributed.planner.tables import tables_of
from shardrec.distributed.planner.topology import GB, Topology, local_world_size_from_env
from shardrec.distributed.planner.types import PlannerError, PlannerTable, ShardingOption
from shardrec.distributed.plugins import find_storage_backend
from shardrec.distributed.sharder_index import SharderIndex
from shardrec.distributed.types import (
    ModuleSharder,
    ParameterSharding,
    ShardingPlan,
    ShardMetadata,
)
from shardrec.kernels.specs import OptimizerType, parse_optimizer
from shardrec.kernels.storage import (
    IN_MEMORY,
    StorageBackend,
    StorageMemory,
    UnknownStorageBackendError,
    storage_memory,
)

DEFAULT_BATCH_SIZE = 512
DEFAULT_OPTIMIZER: Final = OptimizerType.ROWWISE_ADAGRAD
DEFAULT_RESERVED_FRACTION = 0.15


class EmbeddingShardingPlanner:
    """Plans how every shardable table of a model is sharded and where each shard lives.

    ``batch_size`` is samples per rank per step; ``optimizer`` is the fused optimizer whose state
    the tables of a module that names none carry (an :class:`OptimizerType` or a name that
    :func:`shardrec.kernels.parse_optimizer` reads; None: no state; see
    ``estimators.OPTIMIZER_STATE``); ``reserved_fraction`` of every rank's memory is kept for dense
    parameters and activations. Per-table ``constraints`` are keyed by table name (or
    ``module_path.table``). After ``plan`` or ``collective_plan``, ``last_report`` holds the report.

    A table whose config chooses a storage backend (``StorageChoice``) counts only the bytes that
    backend keeps in memory (:class:`shardrec.kernels.StorageMemory`; a file-backed table's rows
    and optimizer state count nothing). ``storage_backends``: name -> backend to ask (a plugin
    manager's ``storage_backends()``); None: the installed plugins', as the lookup finds them.
    """

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        constraints: Mapping[str, ParameterConstraints] | None = None,
        optimizer: OptimizerType | str | None = DEFAULT_OPTIMIZER,
        reserved_fraction: float = DEFAULT_RESERVED_FRACTION,
        max_proposals: int | None = None,
        storage_backends: Mapping[str, StorageBackend] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"EmbeddingShardingPlanner: batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= reserved_fraction < 1.0:
            raise ValueError(
                "EmbeddingShardingPlanner: reserved_fraction must be in [0, 1), "
                f"got {reserved_fraction}"
            )
        self.topology = topology
        self.batch_size = batch_size
        self.constraints: dict[str, ParameterConstraints] = dict(constraints or {})
        self.optimizer = None if optimizer is None else parse_optimizer(optimizer)
        self.reserved_fraction = reserved_fraction
        self.max_proposals = max_proposals
        self.storage_backends = None if storage_backends is None else dict(storage_backends)
        self.last_report: PlanReport | None = None

    def _memory(self, table: PlannerTable) -> StorageMemory:
        """What the table's storage backend keeps in memory; a PlannerError naming the table when
        the backend is unknown or answers badly (so ``collective_plan`` sends it to every rank)."""
        if table.storage is None:
            return IN_MEMORY  # the lookup's built-in backend: tensors on the rank
        name = table.storage.backend
        try:
            if self.storage_backends is None:
                backend = find_storage_backend(name, table=table.fqn)
            elif name in self.storage_backends:
                backend = self.storage_backends[name]
            else:
                raise UnknownStorageBackendError(table.fqn, name, list(self.storage_backends))
        except UnknownStorageBackendError as exc:  # it names the table
            raise PlannerError(str(exc)) from exc
        try:
            return storage_memory(backend, table.storage.options)
        except TypeError as exc:
            raise PlannerError(f"table {table.fqn!r}: {exc}") from exc

    def _topology(self) -> Topology:
        if self.topology is not None:
            return self.topology
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            return Topology(
                world_size=world,
                compute_device="cpu",
                local_world_size=local_world_size_from_env(world),
            )
        raise ValueError(
            "EmbeddingShardingPlanner: give a Topology (no process group to infer one from)"
        )

    def plan(self, module: nn.Module, sharders: Sequence[ModuleSharder]) -> ShardingPlan:
        """Plan ``module`` (any device, meta included) for the planner's topology. Pure and
        deterministic."""
        index = SharderIndex.of(sharders)
        state = rank_state_of(module, index, self._topology())
        return self.plan_tables(tables_of(module, index.module_types()), index, rank_state=state)

    def collective_plan(
        self,
        module: nn.Module,
        sharders: Sequence[ModuleSharder],
        pg: dist.ProcessGroup | None = None,
    ) -> ShardingPlan:
        """Rank 0 of ``pg`` plans and broadcasts, so every rank runs the same plan. If planning
        fails, every rank raises: rank 0 its own error, the others a :class:`PlannerError` that
        names it (a plugin's error left unsent would leave them waiting for the plan)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.plan(module, sharders)
        group = pg if pg is not None else dist.group.WORLD
        payload: list[object] = [None]
        failure: Exception | None = None
        if dist.get_rank(group) == 0:
            try:
                payload = [(self.plan(module, sharders), self.last_report)]
            except PlannerError as exc:
                payload = [exc]
            except Exception as exc:
                failure = exc
                payload = [PlannerError(f"planning failed on rank 0: {type(exc).__name__}: {exc}")]
        src = (
            dist.get_global_rank(group, 0)
            if group is not None and group is not dist.group.WORLD
            else 0
        )
        dist.broadcast_object_list(payload, src=src, group=group)
        if failure is not None:
            raise failure
        received = payload[0]
        if isinstance(received, PlannerError):
            raise received
        assert isinstance(received, tuple)
        plan, report = received
        assert isinstance(plan, ShardingPlan)
        self.last_report = report if isinstance(report, PlanReport) else None
        return plan

    def plan_tables(
        self,
        tables: Sequence[PlannerTable],
        sharders: Sequence[ModuleSharder],
        *,
        rank_state: Sequence[RankState] = (),
    ) -> ShardingPlan:
        """Plan explicit tables (the model already reduced to :class:`PlannerTable`).
        ``rank_state``: what sharders keep on ranks besides the shards, tables named by fqn
        (``plan`` asks the sharders, see :class:`HasRankState`); counted in those ranks' memory."""
        start = time.perf_counter()
        sharders = SharderIndex.of(sharders)  # one index for every table's options
        topology = self._topology()
        self._check_constraint_names(tables)
        caps = capacities(topology, self.reserved_fraction)
        state = self._state(tables, rank_state, topology, caps)
        options: list[list[ShardingOption]] = []
        notes: list[str] = []
        for table in tables:
            memory = self._memory(table)
            if memory != IN_MEMORY and table.storage is not None:
                kept = [
                    what
                    for what, counted in (
                        ("weights", memory.weights),
                        ("optimizer state", memory.optimizer_state),
                    )
                    if not counted
                ]
                notes.append(
                    f"{table.fqn}: {' and '.join(kept)} in {table.storage.backend!r} storage,"
                    " not counted in rank memory"
                )
            workload = resolve_workload(
                table, self.constraints, self.batch_size, self.optimizer, memory
            )
            constraint = self.constraints.get(table.param_name) or self.constraints.get(table.fqn)
            options.append(enumerate_options(table, sharders, topology, workload, constraint))
        if not options:
            self.last_report = None
            return ShardingPlan()
        max_proposals = self.max_proposals or 4 * len(options) + 16
        result = search(options, topology, self.reserved_fraction, max_proposals, state)
        if result.placement is None:
            raise self._infeasible(options, result.failure, topology, caps, rank_state, state)
        self.last_report = build_report(
            result.placement,
            result.reasons,
            topology,
            caps,
            self.batch_size,
            result.proposals,
            result.feasible,
            time.perf_counter() - start,
            notes=((result.note,) if result.note else ()) + tuple(notes) + state_notes(rank_state),
            rank_state=rank_state,
        )
        return to_sharding_plan(result.placement.options)

    def _state(
        self,
        tables: Sequence[PlannerTable],
        rank_state: Sequence[RankState],
        topology: Topology,
        caps: tuple[int, int],
    ) -> np.ndarray | None:
        """Bytes of sharder state per rank (None: none declared); a PlannerError naming the table
        or the rank when a state names an unknown one or the state alone does not fit."""
        if not rank_state:
            return None
        known = {t.fqn for t in tables}
        unknown = sorted({s.table for s in rank_state} - known)
        if unknown:
            raise PlannerError(
                f"rank state is declared for tables the plan does not have: {unknown}; its "
                f"tables are {sorted(known)}"
            )
        per_rank = state_per_rank(rank_state, topology.world_size)
        kind = state_kind(topology)
        cap = caps[0] if kind == "hbm" else caps[1]
        check_state_fits(rank_state, per_rank, cap, kind, topology)
        return per_rank

    def _check_constraint_names(self, tables: Sequence[PlannerTable]) -> None:
        known = {t.param_name for t in tables} | {t.fqn for t in tables}
        unknown = sorted(set(self.constraints) - known)
        if unknown:
            raise PlannerError(
                f"constraints name tables the model does not have: {unknown}; its tables are "
                f"{sorted(t.fqn for t in tables)}"
            )

    def _infeasible(
        self,
        options: Sequence[Sequence[ShardingOption]],
        failure: object,
        topology: Topology,
        caps: tuple[int, int],
        rank_state: Sequence[RankState] = (),
        state: np.ndarray | None = None,
    ) -> PlannerError:
        from shardrec.distributed.planner.partitioner import PlacementFailure

        per_rank = (
            f"{topology.world_size} ranks with {caps[0] / GB:.3f} GiB HBM and "
            f"{caps[1] / GB:.3f} GiB DDR usable each"
        )
        held = ""
        if state is not None:
            # Which ranks the sharders' own state fills, and with what: often the real culprit.
            ranks = [r for r in np.argsort(-state, kind="stable").tolist()[:4] if state[r]]
            held = (
                f"; besides the shards, {state_kind(topology).upper()} holds sharder state: "
                + "; ".join(f"rank {r}: {describe_state(rank_state, r)}" for r in ranks)
            )
        # A table whose smallest option does not fit an empty rank is the clearest culprit.
        for table_options in options:
            smallest = min(table_options, key=lambda o: o.max_shard_storage)
            cap = caps[0] if smallest.storage_kind == "hbm" else caps[1]
            if smallest.max_shard_storage > cap:
                return PlannerError(
                    f"table {smallest.table.fqn!r} does not fit: even sharded "
                    f"{smallest.sharding_type} its largest shard needs "
                    f"{smallest.max_shard_storage / GB:.3f} GiB "
                    f"({smallest.total_storage / GB:.3f} GiB in total), but the topology has "
                    f"{per_rank}{held}"
                )
        total = sum(min(o.total_storage for o in t) for t in options)
        if state is not None:
            total += int(state.sum())
        detail = ""
        if isinstance(failure, tuple) and isinstance(failure[0], PlacementFailure):
            detail = f"; the first placement to fail: {failure[0].describe(failure[1])}"
        return PlannerError(
            f"the tables do not fit together: they need at least {total / GB:.3f} GiB"
            f"{' (sharder state included)' if state is not None else ''}, the "
            f"topology has {per_rank}{detail}{held}"
        )


def to_sharding_plan(options: Sequence[ShardingOption]) -> ShardingPlan:
    plan = ShardingPlan()
    for option in options:
        shards = []
        for s in option.shards:
            assert s.rank is not None
            shards.append(
                ShardMetadata(
                    offsets=(s.row_offset, s.col_offset), sizes=(s.rows, s.cols), rank=s.rank
                )
            )
        plan.plan.setdefault(option.table.module_path, {})[option.table.param_name] = (
            ParameterSharding(
                sharding_type=option.sharding_type,
                compute_kernel=option.compute_kernel,
                ranks=tuple(s.rank for s in shards),
                shards=tuple(shards),
            )
        )
    return plan
