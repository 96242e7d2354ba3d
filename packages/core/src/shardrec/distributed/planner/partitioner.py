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
from shardrec.distributed.planner.rank_state import state_kind
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
        self._cache: dict[int, tuple[ShardingOption, np.ndarray, np.ndarray, np.ndarray]] = {}

    def of(self, option: ShardingOption) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per rank: storage, time, and bytes sent to each peer (``from_owner``)."""
        hit = self._cache.get(id(option))
        if hit is not None and hit[0] is option:
            return hit[1], hit[2], hit[3]
        mem = np.zeros(self._w, dtype=np.int64)
        perf = np.zeros(self._w, dtype=np.float64)
        sends = np.zeros(self._w, dtype=np.float64)
        for shard in option.shards:
            assert shard.rank is not None
            mem[shard.rank] += shard.storage
            perf[shard.rank] += shard.perf
            sends[shard.rank] += shard.cost.from_owner
        self._cache[id(option)] = (option, mem, perf, sends)
        return mem, perf, sends


def partition(
    proposal: Sequence[ShardingOption],
    topology: Topology,
    reserved_fraction: float,
    fixed_loads: FixedLoads | None = None,
    target_step: float | None = None,
    *,
    state: np.ndarray | None = None,
) -> Placement | PlacementFailure:
    """Places ``proposal``; with ``target_step``, a host group goes to a host where it keeps every
    rank's time within that target and whose ranks send the fewest bytes so far, where one has
    room (see ``_place_on_hosts``). ``state``: bytes per rank that sharders keep there besides
    the shards (``rank_state.py``), in the compute device's memory before any shard."""
    w = topology.world_size
    loads = fixed_loads if fixed_loads is not None else FixedLoads(w)
    hbm_cap, ddr_cap = capacities(topology, reserved_fraction)
    used = {"hbm": np.zeros(w, dtype=np.int64), "ddr": np.zeros(w, dtype=np.int64)}
    if state is not None:
        used[state_kind(topology)] += state
    cap = {"hbm": hbm_cap, "ddr": ddr_cap}
    perf = np.zeros(w, dtype=np.float64)
    sends = np.zeros(w, dtype=np.float64)
    placed: list[list[ShardSpec]] = [list(o.shards) for o in proposal]

    for i, option in enumerate(proposal):
        if not option.fixed_ranks:
            continue
        mem = used[option.storage_kind]
        add_mem, add_perf, add_sends = loads.of(option)
        mem += add_mem
        perf += add_perf
        sends += add_sends
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
            ranks = _place_on_hosts(
                option, used[kind], cap[kind], perf, topology, sends, target_step
            )
            if ranks is None:
                free_max = int(cap[kind] - used[kind].min())
                return PlacementFailure(i, option.max_shard_storage, kind, free_max)
            for k, shard in enumerate(option.shards):
                rank = ranks[k]
                used[kind][rank] += shard.storage
                perf[rank] += shard.perf
                sends[rank] += shard.cost.from_owner
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
        sends[rank] += shard.cost.from_owner
        heapq.heappush(heap, (float(perf[rank]), rank))
        taken.add(rank)
        placed[i][j] = shard.placed(rank)

    options = tuple(
        option if option.fixed_ranks else _with_shards(option, tuple(shards))
        for option, shards in zip(proposal, placed, strict=True)
    )
    return Placement(options, evaluate(options, topology, used["hbm"], used["ddr"]))


def _place_on_hosts(
    option: ShardingOption,
    used: np.ndarray,
    cap: int,
    perf: np.ndarray,
    topology: Topology,
    sends: np.ndarray,
    target_step: float | None,
) -> list[int] | None:
    """A rank for each shard of a host-grouped option, or None where a group finds no host.

    Group by group (slowest first), the group's pieces go to a host's least-loaded ranks (slowest
    piece on the least-loaded rank) that hold no other piece of the table and have room: on the
    host whose slowest rank stays fastest, the lowest on ties. With ``target_step``, among the
    hosts whose ranks all stay within it, on the one whose busiest sender (``sends``: bytes a rank
    sends each peer) sends least with the group added, for bytes across hosts are what a host's
    ranks share out.
    """
    local = topology.ranks_per_host
    hosts = topology.world_size // local
    groups = option.host_groups
    members: dict[int, list[int]] = {}
    for k, g in enumerate(groups):
        members.setdefault(g, []).append(k)
    perf = perf.astype(np.float64).copy()
    used = used.copy()
    sends = sends.copy()
    taken = np.zeros(topology.world_size, dtype=bool)
    ranks = [-1] * len(option.shards)
    shards = option.shards

    def heaviest(g: int) -> tuple[float, int, int]:
        worst = max(members[g], key=lambda k: (shards[k].perf, shards[k].storage))
        return (-shards[worst].perf, -shards[worst].storage, g)

    for g in sorted(members, key=heaviest):
        pieces = sorted(members[g], key=lambda k: (-shards[k].perf, -shards[k].storage, k))
        n = len(pieces)
        add_perf = np.array([shards[k].perf for k in pieces])
        add_mem = np.array([shards[k].storage for k in pieces], dtype=np.int64)
        load = perf.reshape(hosts, local)
        free_load = np.where(taken.reshape(hosts, local), np.inf, load)
        order = np.argsort(free_load, axis=1, kind="stable")[:, :n]
        picked = np.take_along_axis(free_load, order, axis=1)
        room = np.take_along_axis(used.reshape(hosts, local), order, axis=1) + add_mem <= cap
        fits = np.isfinite(picked).all(axis=1) & room.all(axis=1)
        if not fits.any():
            return None
        slowest = np.maximum(load.max(axis=1), (picked + add_perf).max(axis=1))
        host = int(np.argmin(np.where(fits, slowest, np.inf)))
        if target_step is not None:
            within = fits & (slowest <= target_step)
            if within.any():
                add_sends = np.array([shards[k].cost.from_owner for k in pieces])
                sent = np.take_along_axis(sends.reshape(hosts, local), order, axis=1) + add_sends
                host = int(np.argmin(np.where(within, sent.max(axis=1), np.inf)))
        for k, local_rank in zip(pieces, order[host].tolist(), strict=True):
            rank = host * local + int(local_rank)
            ranks[k] = rank
            taken[rank] = True
            perf[rank] += shards[k].perf
            used[rank] += shards[k].storage
            sends[rank] += shards[k].cost.from_owner
    return ranks


def rebalance_memory(
    placement: Placement,
    topology: Topology,
    reserved_fraction: float,
    max_moves: int,
    max_step: float,
) -> Placement:
    """Moves shards off the fullest rank to an emptier one that can take them, one at a time,
    while each move lowers the fullest rank's memory, keeps the step within ``max_step`` and adds
    no bytes to the rank that sends most across hosts."""
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
                if (
                    candidate.max_perf <= max(max_step, placement.max_perf)
                    and candidate.max_memory < placement.max_memory
                    and max(candidate.load.sent_inter) <= max(load.sent_inter)
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
        host_groups=option.host_groups,
    )
