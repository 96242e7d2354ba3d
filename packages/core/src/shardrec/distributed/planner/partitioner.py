"""Places the shards of one proposal (one option per table) on ranks, within each rank's memory.

Greedy and deterministic: shards whose layout fixes their ranks (row-wise, data-parallel) go first;
the others are taken from slowest to fastest (then largest, then by name) and each goes to the rank
with the least estimated time so far that still has room, preferring a rank that holds no other
shard of the same table (column-wise shards spread out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shardrec.distributed.planner.topology import GB, Topology
from shardrec.distributed.planner.types import ShardingOption, ShardSpec


@dataclass(frozen=True, slots=True)
class RankLoad:
    """Estimated bytes (HBM, DDR) and seconds per step on every rank."""

    hbm: tuple[int, ...]
    ddr: tuple[int, ...]
    perf: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Placement:
    """Every option of a proposal with its shards placed; ``load`` sums them per rank."""

    options: tuple[ShardingOption, ...]
    load: RankLoad

    @property
    def max_perf(self) -> float:
        return max(self.load.perf)


@dataclass(frozen=True, slots=True)
class PlacementFailure:
    """The first table that found no room, with what it needed and what the ranks had left."""

    table_index: int
    needed: int
    kind: str
    free_max: int

    def describe(self, option: ShardingOption) -> str:
        return (
            f"table {option.table.fqn!r} sharded {option.sharding_type} needs "
            f"{_gb(option.max_shard_storage)} of {self.kind.upper()} on one rank "
            f"({_gb(option.total_storage)} in total), but the most free {self.kind.upper()} on "
            f"any rank is {_gb(self.free_max)}"
        )


def _gb(n: float) -> str:
    return f"{n / GB:.3f} GiB"


def capacities(topology: Topology, reserved_fraction: float) -> tuple[int, int]:
    """Usable (HBM, DDR) bytes per rank after the reservation for dense parts and activations."""
    keep = 1.0 - reserved_fraction
    return int(topology.hbm_per_rank * keep), int(topology.ddr_cap * keep)


class FixedLoads:
    """Per-rank storage and time vectors of fixed-rank options, computed once per option."""

    def __init__(self, world_size: int) -> None:
        self._w = world_size
        self._cache: dict[int, tuple[ShardingOption, np.ndarray, np.ndarray]] = {}

    def of(self, option: ShardingOption) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(id(option))
        if hit is not None and hit[0] is option:
            return hit[1], hit[2]
        mem = np.zeros(self._w, dtype=np.int64)
        perf = np.zeros(self._w, dtype=np.float64)
        for shard in option.shards:
            assert shard.rank is not None
            mem[shard.rank] += shard.storage
            perf[shard.rank] += shard.perf
        self._cache[id(option)] = (option, mem, perf)
        return mem, perf


def partition(
    proposal: Sequence[ShardingOption],
    topology: Topology,
    reserved_fraction: float,
    fixed_loads: FixedLoads | None = None,
) -> Placement | PlacementFailure:
    w = topology.world_size
    loads = fixed_loads if fixed_loads is not None else FixedLoads(w)
    hbm_cap, ddr_cap = capacities(topology, reserved_fraction)
    used = {"hbm": np.zeros(w, dtype=np.int64), "ddr": np.zeros(w, dtype=np.int64)}
    cap = {"hbm": hbm_cap, "ddr": ddr_cap}
    perf = np.zeros(w, dtype=np.float64)
    placed: list[list[ShardSpec]] = [list(o.shards) for o in proposal]

    for i, option in enumerate(proposal):
        if not option.fixed_ranks:
            continue
        mem = used[option.storage_kind]
        add_mem, add_perf = loads.of(option)
        mem += add_mem
        perf += add_perf
        if int(mem.max()) > cap[option.storage_kind]:
            free_max = int(cap[option.storage_kind] - (mem - add_mem).min())
            return PlacementFailure(i, option.max_shard_storage, option.storage_kind, free_max)

    free = [
        (i, j)
        for i, option in enumerate(proposal)
        if not option.fixed_ranks
        for j in range(len(option.shards))
    ]
    free.sort(
        key=lambda ij: (
            -proposal[ij[0]].shards[ij[1]].perf,
            -proposal[ij[0]].shards[ij[1]].storage,
            proposal[ij[0]].table.fqn,
            ij[1],
        )
    )
    holds: dict[int, np.ndarray] = {}
    for i, j in free:
        option = proposal[i]
        shard = option.shards[j]
        mem = used[option.storage_kind]
        fits = mem + shard.storage <= cap[option.storage_kind]
        if not fits.any():
            free_max = int(cap[option.storage_kind] - mem.min())
            return PlacementFailure(i, shard.storage, option.storage_kind, free_max)
        taken = holds.setdefault(i, np.zeros(w, dtype=bool))
        candidates = fits & ~taken
        if not candidates.any():
            candidates = fits
        # argmin returns the first (lowest) rank among equals: deterministic.
        score = np.where(candidates, perf, np.inf)
        rank = int(np.argmin(score))
        mem[rank] += shard.storage
        perf[rank] += shard.perf
        taken[rank] = True
        placed[i][j] = shard.placed(rank)

    options = tuple(
        option if option.fixed_ranks else _with_shards(option, tuple(shards))
        for option, shards in zip(proposal, placed, strict=True)
    )
    load = RankLoad(
        hbm=tuple(int(x) for x in used["hbm"]),
        ddr=tuple(int(x) for x in used["ddr"]),
        perf=tuple(float(x) for x in perf),
    )
    return Placement(options, load)


def _with_shards(option: ShardingOption, shards: tuple[ShardSpec, ...]) -> ShardingOption:
    return ShardingOption(
        table=option.table,
        sharding_type=option.sharding_type,
        compute_kernel=option.compute_kernel,
        shards=shards,
        fixed_ranks=option.fixed_ranks,
        storage_kind=option.storage_kind,
        note=option.note,
        estimated_by=option.estimated_by,
    )
