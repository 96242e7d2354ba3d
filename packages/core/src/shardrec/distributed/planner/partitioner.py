"""Places the shards of one proposal (one option per table) on ranks, within each rank's memory.

Greedy and deterministic: shards whose layout fixes their ranks (row-wise, data-parallel) go first;
the others are taken from slowest to fastest (then largest, then by name) and each goes to the rank
with the least estimated time so far that still has room, preferring a rank that holds no other
shard of the same table (column-wise shards spread out), then the lowest rank. The placed plan is
then priced exactly by the per-rank model (``rank_model.py``), which ``rebalance_memory`` uses to
move shards off the fullest rank where that does not slow the step.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shardrec.distributed.planner.rank_model import RankLoad, evaluate
from shardrec.distributed.planner.topology import GB, Topology
from shardrec.distributed.planner.types import ShardingOption, ShardSpec

__all__ = [
    "FixedLoads",
    "Placement",
    "PlacementFailure",
    "RankLoad",
    "capacities",
    "partition",
    "rebalance_memory",
]


@dataclass(frozen=True, slots=True)
class Placement:
    """Every option of a proposal with its shards placed; ``load`` is the per-rank model of it."""

    options: tuple[ShardingOption, ...]
    load: RankLoad

    @property
    def max_perf(self) -> float:
        return self.load.step

    @property
    def max_memory(self) -> int:
        return max(max(self.load.hbm), max(self.load.ddr))


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

    # One-host options are placed whole (j = -1), ranked by their slowest and largest piece.
    free = [
        (i, j)
        for i, option in enumerate(proposal)
        if not option.fixed_ranks
        for j in ((-1,) if option.one_host else range(len(option.shards)))
    ]

    def order(ij: tuple[int, int]) -> tuple[float, int, str, int]:
        option = proposal[ij[0]]
        if ij[1] < 0:
            return (-option.max_shard_perf, -option.max_shard_storage, option.table.fqn, -1)
        shard = option.shards[ij[1]]
        return (-shard.perf, -shard.storage, option.table.fqn, ij[1])

    free.sort(key=order)
    # Least-loaded rank first: a heap of (time so far, rank); entries go stale when a rank is
    # loaded and are skipped then. Ranks popped but not taken go back.
    heap = [(float(perf[r]), r) for r in range(w)]
    heapq.heapify(heap)
    holds: dict[int, set[int]] = {}
    for i, j in free:
        option = proposal[i]
        if j < 0:
            kind = option.storage_kind
            host = _place_on_a_host(option, used[kind], cap[kind], perf, topology)
            if host is None:
                free_max = int(cap[kind] - used[kind].min())
                return PlacementFailure(i, option.max_shard_storage, kind, free_max)
            for k, shard in enumerate(option.shards):
                rank = host * topology.ranks_per_host + k
                used[kind][rank] += shard.storage
                perf[rank] += shard.perf
                heapq.heappush(heap, (float(perf[rank]), rank))
                placed[i][k] = shard.placed(rank)
            continue
        shard = option.shards[j]
        mem = used[option.storage_kind]
        room = cap[option.storage_kind] - shard.storage
        taken = holds.setdefault(i, set())
        skipped: list[tuple[float, int]] = []
        rank = -1
        fallback = -1
        while heap:
            entry = heapq.heappop(heap)
            load, r = entry
            if load != perf[r]:
                continue  # stale
            skipped.append(entry)
            if mem[r] > room:
                continue
            if r in taken:
                if fallback < 0:
                    fallback = r
                continue
            rank = r
            break
        if rank < 0:
            rank = fallback
        if rank < 0:
            free_max = int(cap[option.storage_kind] - mem.min())
            return PlacementFailure(i, shard.storage, option.storage_kind, free_max)
        for entry in skipped:
            if entry[1] != rank:
                heapq.heappush(heap, entry)
        mem[rank] += shard.storage
        perf[rank] += shard.perf
        heapq.heappush(heap, (float(perf[rank]), rank))
        taken.add(rank)
        placed[i][j] = shard.placed(rank)

    options = tuple(
        option if option.fixed_ranks else _with_shards(option, tuple(shards))
        for option, shards in zip(proposal, placed, strict=True)
    )
    return Placement(options, evaluate(options, topology, used["hbm"], used["ddr"]))


def _place_on_a_host(
    option: ShardingOption, used: np.ndarray, cap: int, perf: np.ndarray, topology: Topology
) -> int | None:
    """The host whose slowest rank stays fastest with piece k on its local rank k (room allowing);
    the lowest such host on ties."""
    local = topology.ranks_per_host
    hosts = topology.world_size // local
    add_mem = np.zeros(local, dtype=np.int64)
    add_perf = np.zeros(local)
    for k, shard in enumerate(option.shards):
        add_mem[k] += shard.storage
        add_perf[k] += shard.perf
    fits = ((used.reshape(hosts, local) + add_mem) <= cap).all(axis=1)
    if not fits.any():
        return None
    slowest = (perf.reshape(hosts, local) + add_perf).max(axis=1)
    return int(np.argmin(np.where(fits, slowest, np.inf)))


def rebalance_memory(
    placement: Placement,
    topology: Topology,
    reserved_fraction: float,
    max_moves: int,
    max_step: float,
) -> Placement:
    """Moves shards off the fullest rank to an emptier one that can take them, one at a time,
    while each move lowers the fullest rank's memory and keeps the step within ``max_step``."""
    hbm_cap, ddr_cap = capacities(topology, reserved_fraction)
    cap = {"hbm": hbm_cap, "ddr": ddr_cap}
    best = placement
    for _ in range(max_moves):
        moved = _one_move(best, topology, cap, max_step)
        if moved is None:
            break
        best = moved
    return best


def _one_move(
    placement: Placement, topology: Topology, cap: dict[str, int], max_step: float
) -> Placement | None:
    load = placement.load
    for kind, used_t in (("hbm", load.hbm), ("ddr", load.ddr)):
        used = np.array(used_t, dtype=np.int64)
        if not used.any():
            continue
        fullest = int(np.argmax(used))
        # Candidate shards on the fullest rank, largest first.
        pieces = [
            (shard.storage, i, j)
            for i, option in enumerate(placement.options)
            if not option.fixed_ranks and not option.one_host and option.storage_kind == kind
            for j, shard in enumerate(option.shards)
            if shard.rank == fullest
        ]
        pieces.sort(key=lambda p: (-p[0], p[1], p[2]))
        order = np.argsort(used, kind="stable")
        for size, i, j in pieces:
            option = placement.options[i]
            holding = {s.rank for s in option.shards}
            for target in order[:8]:
                target = int(target)
                if target == fullest or target in holding:
                    continue
                if used[target] + size >= used[fullest] or used[target] + size > cap[kind]:
                    continue
                shards = list(option.shards)
                shards[j] = shards[j].placed(target)
                options = list(placement.options)
                options[i] = _with_shards(option, tuple(shards))
                hbm = np.array(load.hbm, dtype=np.int64)
                ddr = np.array(load.ddr, dtype=np.int64)
                moved = hbm if kind == "hbm" else ddr
                moved[fullest] -= size
                moved[target] += size
                candidate = Placement(tuple(options), evaluate(options, topology, hbm, ddr))
                if candidate.max_perf <= max(max_step, placement.max_perf) and (
                    candidate.max_memory < placement.max_memory
                ):
                    return candidate
    return None


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
        one_host=option.one_host,
    )
