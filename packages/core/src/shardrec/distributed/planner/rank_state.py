"""State a sharder keeps on ranks besides the shards the planner places: a managed table's id
maps, for instance, live on the ranks that own their buckets whatever the table's sharding.

A sharder declares it with :class:`HasRankState` (one method, asked once per shardable module of
the model); the planner adds each rank's bytes to that rank's memory before it places any shard,
refuses a plan where they alone do not fit (naming the rank and the tables), and reports them
per rank. Such state lives where the sharded module keeps its buffers: on the compute device, so
in HBM on an accelerator and in DDR on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from torch import nn

from shardrec.distributed.planner.tables import shardable_modules, tables_in_module
from shardrec.distributed.planner.topology import GB, Topology
from shardrec.distributed.planner.types import PlannerError
from shardrec.distributed.sharder_index import SharderIndex

__all__ = [
    "HasRankState",
    "RankState",
    "check_state_fits",
    "describe_state",
    "rank_state_of",
    "state_kind",
    "state_notes",
    "state_per_rank",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RankState:
    """``nbytes`` of state that a sharder keeps on ``rank`` for ``table`` beside the table's
    planned shards (``what`` says what it is, for the report and the errors).

    A sharder names ``table`` as its module does (the config's name); the planner prefixes the
    module's path, so the states :meth:`EmbeddingShardingPlanner.plan_tables` takes name tables
    by ``PlannerTable.fqn``. Several states may name one table and one rank (they add up).
    """

    table: str
    rank: int
    nbytes: int
    what: str = "sharder state"

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"RankState of table {self.table!r}: rank must be an int >= 0")
        if self.nbytes < 0:
            raise ValueError(f"RankState of table {self.table!r}: nbytes must be an int >= 0")


@runtime_checkable
class HasRankState(Protocol):
    """A sharder that keeps state of its own on some ranks for the modules it shards, beside the
    tables' shards: per table and rank, its bytes when ``module`` is sharded over ``world_size``
    ranks (``module`` may be on the meta device). Counted whatever sharding types the plan picks
    for the module's tables; placed exactly where the sharded module puts it."""

    def planner_rank_state(self, module: nn.Module, world_size: int) -> Sequence[RankState]: ...


def state_kind(topology: Topology) -> str:
    """Which memory sharder state takes: the compute device's."""
    return "hbm" if topology.uses_hbm else "ddr"


def declared_state(
    sharder: HasRankState, module: nn.Module, module_path: str, tables: Sequence[str], world: int
) -> list[RankState]:
    """``sharder``'s states for ``module`` (at ``module_path``), checked and named by fqn."""
    who = type(sharder).__qualname__
    states = sharder.planner_rank_state(module, world)
    out: list[RankState] = []
    for state in states:
        if not isinstance(state, RankState):
            raise TypeError(
                f"{who}.planner_rank_state returned {type(state).__qualname__}, not a RankState"
            )
        if state.table not in tables:
            raise PlannerError(
                f"{who}.planner_rank_state names table {state.table!r}, which module "
                f"{module_path or '<root>'!r} does not have (its tables: {list(tables)})"
            )
        fqn = f"{module_path}.{state.table}" if module_path else state.table
        out.append(RankState(table=fqn, rank=state.rank, nbytes=state.nbytes, what=state.what))
    return out


def rank_state_of(model: nn.Module, sharders: SharderIndex, topology: Topology) -> list[RankState]:
    """The state every sharder of a shardable module of ``model`` declares for it (each sharder
    asked once per module), its tables named by fqn."""
    out: list[RankState] = []
    for path, module in shardable_modules(model, sharders.module_types()):
        asked: set[int] = set()
        for sharder in sharders.offered(type(module), topology.compute_device).values():
            if id(sharder) in asked or not isinstance(sharder, HasRankState):
                continue
            asked.add(id(sharder))
            tables = [t.param_name for t in tables_in_module(module, path)]
            out += declared_state(sharder, module, path, tables, topology.world_size)
    return out


def state_per_rank(states: Sequence[RankState], world_size: int) -> np.ndarray:
    """Bytes of state on each rank (int64, ``world_size`` long); a PlannerError naming the table
    when a state names a rank the topology does not have."""
    out = np.zeros(world_size, dtype=np.int64)
    for state in states:
        if state.rank >= world_size:
            raise PlannerError(
                f"table {state.table!r}: its {state.what} is declared on rank {state.rank}, but "
                f"the topology has {world_size} ranks"
            )
        out[state.rank] += state.nbytes
    return out


def _by_rank(states: Sequence[RankState]) -> Mapping[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for state in states:
        tables = out.setdefault(state.rank, {})
        tables[state.table] = tables.get(state.table, 0) + state.nbytes
    return out


def describe_state(states: Sequence[RankState], rank: int) -> str:
    """``rank``'s state as ``'t0' 1.000 GiB (id map), ...``, its 6 largest tables."""
    what: dict[str, str] = {}
    for state in states:
        what.setdefault(state.table, state.what)
    held = sorted(_by_rank(states).get(rank, {}).items(), key=lambda tn: (-tn[1], tn[0]))
    text = ", ".join(f"{t!r} {n / GB:.3f} GiB ({what[t]})" for t, n in held[:6])
    return text + (f" and {len(held) - 6} more tables" if len(held) > 6 else "")


def check_state_fits(
    states: Sequence[RankState], per_rank: np.ndarray, cap: int, kind: str, topology: Topology
) -> None:
    """A PlannerError naming the fullest rank and its tables when state alone exceeds ``cap``."""
    if not len(per_rank) or int(per_rank.max()) <= cap:
        return
    rank = int(np.argmax(per_rank))
    raise PlannerError(
        f"rank {rank} does not fit the state its sharders keep beside the tables' shards: "
        f"{describe_state(states, rank)}, {int(per_rank[rank]) / GB:.3f} GiB in all, but each of "
        f"the {topology.world_size} ranks has {cap / GB:.3f} GiB {kind.upper()} usable"
    )


def state_notes(states: Sequence[RankState]) -> tuple[str, ...]:
    """The report's line on sharder state: what it is, how much, on how many ranks."""
    total = sum(s.nbytes for s in states)
    if not total:
        return ()
    kinds = sorted({s.what for s in states})
    ranks = len({s.rank for s in states if s.nbytes})
    tables = len({s.table for s in states if s.nbytes})
    return (
        f"sharder state beside the shards ({', '.join(kinds)}) of {tables} table(s): "
        f"{total / GB:.3f} GiB on {ranks} rank(s), counted in their memory (the state columns)",
    )
