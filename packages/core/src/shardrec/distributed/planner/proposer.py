"""Searches proposals (one option per table) and keeps the placed one with the fastest step.

A proposal is made for a cap T on the time of any one shard: each table takes its cheapest option
(in total time, the bytes it makes every rank send included) whose slowest shard stays within T, or
its fastest-shard option if none does. Every distinct shard time of every option is tried as T,
from loose to tight (so the first proposal is each table's cheapest option). A proposal that does
not fit is repaired: the table that found no room moves to its next option with smaller shards,
until it fits or runs out of options. Each placed proposal is priced by the per-rank model
(``rank_model.py``): its step is the slowest rank's compute plus communication.

Of the proposals whose step is within STEP_TOLERANCE of the fastest, the best is the least by
``objective``: the fullest rank's memory, then the most bytes any rank sends across hosts, then the
slowest ranks one after the other. Then three local searches, one table changing its option at a
time: while the step stays within STEP_TOLERANCE, tables on the fullest rank move to options with
smaller shards where that lowers the objective; while it stays within NETWORK_TOLERANCE of the
fastest (the per-rank model sees each rank's own link, not the fabric all hosts share, so a
slightly slower estimated step is worth fewer bytes across hosts), tables on the rank that sends
most across hosts move to the option that sends least, the fullest rank taking at most
MEMORY_SLACK more memory; last, shards move off the fullest rank. Each choice records why, for the
report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from shardrec.distributed.planner.partitioner import (
    FixedLoads,
    Placement,
    PlacementFailure,
    partition,
    rebalance_memory,
)
from shardrec.distributed.planner.topology import Topology
from shardrec.distributed.planner.types import ShardingOption

# Estimated steps this close to the fastest are ties (the estimates are a model): memory decides.
STEP_TOLERANCE: Final = 0.02
# How much slower an estimated step may get to send fewer bytes across hosts (see above).
NETWORK_TOLERANCE: Final = 0.2
# How many more bytes across hosts than the quietest proposal's busiest rank the faster plans
# grown from it may send.
NETWORK_SLACK: Final = 0.10
# Tables of one rank a local search tries to move, the ones that weigh most on it first.
LOCAL_TABLES: Final = 3

Objective = tuple[int, float, tuple[float, ...]]


def objective(placement: Placement) -> Objective:
    """What makes one placement better than another of about the same step (lower is better):
    the fullest rank's memory, then the most bytes a rank sends across hosts (the scarcest link),
    then the slowest ranks one after the other (so the ranks behind the bottleneck are balanced
    too)."""
    load = placement.load
    return (placement.max_memory, max(load.sent_inter), tuple(sorted(load.perf, reverse=True)))


@dataclass(frozen=True, slots=True)
class SearchResult:
    placement: Placement | None
    reasons: tuple[str, ...]
    proposals: int
    feasible: int
    failure: tuple[PlacementFailure, ShardingOption] | None
    note: str = ""  # which of the two searches' plans was kept, and why


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _label(option: ShardingOption) -> str:
    return f"{option.sharding_type} ({option.note})" if option.note else option.sharding_type


def _initial_reason(options: Sequence[ShardingOption]) -> str:
    chosen = options[0]
    if len(options) == 1:
        return f"{_label(chosen)}: the only option allowed"
    runner = next((o for o in options[1:] if o.sharding_type != chosen.sharding_type), options[1])
    return (
        f"{_label(chosen)}: least total step time ({_ms(chosen.total_perf)} vs "
        f"{_ms(runner.total_perf)} {_label(runner)})"
    )


class _Search:
    def __init__(
        self,
        options: Sequence[Sequence[ShardingOption]],
        topology: Topology,
        reserved_fraction: float,
        max_proposals: int,
        state: np.ndarray | None = None,
    ) -> None:
        self.options = options
        self.state = state
        self.topology = topology
        self.reserved = reserved_fraction
        self.max_proposals = max_proposals
        self.loads = FixedLoads(topology.world_size)
        self.proposals = 0
        self.feasible = 0
        self.cache: dict[tuple[float, ...], Placement | PlacementFailure] = {}

    def place(
        self, choice: Sequence[int], target_step: float | None = None
    ) -> Placement | PlacementFailure:
        key = (*choice, -1.0 if target_step is None else target_step)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        self.proposals += 1
        proposal = [o[c] for o, c in zip(self.options, choice, strict=True)]
        result = partition(
            proposal, self.topology, self.reserved, self.loads, target_step, state=self.state
        )
        if isinstance(result, Placement):
            self.feasible += 1
        self.cache[key] = result
        return result

    def budget_left(self) -> bool:
        return self.proposals < self.max_proposals


def _fix(
    s: _Search, choice: list[int]
) -> tuple[Placement | None, tuple[PlacementFailure, ShardingOption] | None, dict[int, str]]:
    """Place ``choice``, moving tables that find no room to smaller options; None if it cannot
    fit. Also returns why each moved table moved."""
    options = s.options
    first_failure: tuple[PlacementFailure, ShardingOption] | None = None
    moved: dict[int, str] = {}
    result = s.place(choice)
    while isinstance(result, PlacementFailure):
        i = result.table_index
        current = options[i][choice[i]]
        if first_failure is None:
            first_failure = (result, current)
        nxt = next(
            (
                k
                for k in range(len(options[i]))
                if options[i][k].max_shard_storage < current.max_shard_storage
            ),
            None,
        )
        if nxt is None or not s.budget_left():
            return None, first_failure, moved
        choice[i] = nxt
        detail = result.describe(current).split(" needs ", 1)[1]
        moved[i] = f"{_label(options[i][nxt])}: {_label(current)} did not fit (needs {detail})"
        result = s.place(choice)
    return result, first_failure, moved


def _capped_choice(max_perf: Sequence[Sequence[float]], cap: float) -> list[int]:
    choice: list[int] = []
    for perfs in max_perf:
        k = next((k for k, m in enumerate(perfs) if m <= cap), None)
        if k is None:
            k = min(range(len(perfs)), key=lambda j: (perfs[j], j))
        choice.append(k)
    return choice


def _capped_reason(opts: Sequence[ShardingOption], k: int) -> str:
    if k == 0:
        return _initial_reason(opts)
    return (
        f"{_label(opts[k])}: the cheapest option whose slowest shard takes at most "
        f"{_ms(opts[k].max_shard_perf)} ({_label(opts[0])}, cheaper in total at "
        f"{_ms(opts[0].total_perf)}, would put {_ms(opts[0].max_shard_perf)} on one rank)"
    )


def search(
    options: Sequence[Sequence[ShardingOption]],
    topology: Topology,
    reserved_fraction: float,
    max_proposals: int,
    state: np.ndarray | None = None,
) -> SearchResult:
    """``state``: bytes per rank that sharders keep there besides the shards (see
    ``partition``)."""
    s = _Search(options, topology, reserved_fraction, max_proposals, state)
    max_perf = [[o.max_shard_perf for o in opts] for opts in options]
    caps = sorted({m for perfs in max_perf for m in perfs}, reverse=True)
    found: list[tuple[Placement, tuple[int, ...], tuple[int, ...], dict[int, str]]] = []
    first_failure: tuple[PlacementFailure, ShardingOption] | None = None
    tried: set[tuple[int, ...]] = set()
    for cap in caps:
        if not s.budget_left():
            break
        choice = _capped_choice(max_perf, cap)
        if tuple(choice) in tried:
            continue  # a looser cap already proposed it
        tried.add(tuple(choice))
        capped = tuple(choice)
        placement, failure, moved = _fix(s, choice)
        if first_failure is None:
            first_failure = failure
        if placement is not None:
            found.append((placement, tuple(choice), capped, moved))
    if not found:
        return SearchResult(None, (), s.proposals, s.feasible, first_failure)
    fastest = min(f[0].max_perf for f in found)
    limit = fastest * (1 + STEP_TOLERANCE)
    picked, picked_choice, capped, moved = min(
        (f for f in found if f[0].max_perf <= limit), key=lambda f: objective(f[0])
    )
    why = [moved.get(i) or _capped_reason(options[i], k) for i, k in enumerate(capped)]
    s.max_proposals += 8 * len(options)
    fast = _Local(s, list(picked_choice), picked, why)
    fast.shrink_fullest(limit)
    chosen = fast
    note = ""
    quiet = _quiet_start(s)
    if quiet is not None:
        quiet.speed_up(max(quiet.placement.load.sent_inter) * (1 + NETWORK_SLACK))
        a, b = fast.placement, quiet.placement
        a_sent, b_sent = max(a.load.sent_inter), max(b.load.sent_inter)
        if b_sent < a_sent and b.max_perf <= a.max_perf * (1 + NETWORK_TOLERANCE):
            chosen = quiet
            note = (
                f"kept the plan grown from the one that sends fewest bytes across hosts: its "
                f"busiest rank sends {b_sent / 1e6:.1f} MB across hosts per step against "
                f"{a_sent / 1e6:.1f} MB in the fastest plan found, its step {_ms(b.max_perf)} "
                f"against {_ms(a.max_perf)} (within {NETWORK_TOLERANCE:.0%})"
            )
    shards = sum(len(o.shards) for o in chosen.placement.options)
    balanced = rebalance_memory(
        chosen.placement, topology, reserved_fraction, shards, chosen.placement.max_perf
    )
    return SearchResult(balanced, tuple(chosen.reasons), s.proposals, s.feasible, None, note)


def _quiet_start(s: _Search) -> _Local | None:
    """The proposal that sends fewest bytes across hosts: each table its option that sends
    fewest in all (the faster on ties), placed; None if it does not fit."""
    topology = s.topology
    w = topology.world_size
    remote = w - topology.ranks_per_host
    if remote == 0:
        return None
    choice: list[int] = []
    reasons: list[str] = []
    for opts in s.options:
        # Table-wise and table-row-wise send the same bytes across hosts in all (each pooled row
        # crosses once); the one that spreads them over more ranks sends fewest from any one.
        k = min(
            range(len(opts)),
            key=lambda k: (
                float(f"{_bytes_across_hosts(opts[k], w, remote):.6g}"),
                _bytes_across_hosts(opts[k], w, remote) / len(opts[k].shards),
                opts[k].total_perf,
                k,
            ),
        )
        choice.append(k)
        reasons.append(
            f"{_label(opts[k])}: sends fewest bytes across hosts "
            f"({_bytes_across_hosts(opts[k], w, remote) / 1e6:.1f} MB per step in all)"
        )
    placement = s.place(choice)
    if not isinstance(placement, Placement):
        return None
    return _Local(s, choice, placement, reasons)


class _Local:
    """Local searches from one proposal: one table at a time changes its option."""

    def __init__(
        self,
        s: _Search,
        choice: list[int],
        placement: Placement,
        reasons: list[str],
    ) -> None:
        self.s = s
        self.choice = choice
        self.placement = placement
        self.reasons = reasons

    def _tables_on(self, rank: int) -> list[int]:
        held: dict[int, int] = {}
        for i, option in enumerate(self.placement.options):
            for shard in option.shards:
                if shard.rank == rank:
                    held[i] = held.get(i, 0) + shard.storage
        return sorted(held, key=lambda i: (-held[i], i))

    def _try(self, i: int, k: int, target_step: float | None = None) -> Placement | None:
        """The placement with table ``i`` on option ``k``, if it fits; ``target_step`` goes to the
        partitioner."""
        trial = list(self.choice)
        trial[i] = k
        result = self.s.place(trial, target_step)
        return result if isinstance(result, Placement) else None

    def shrink_fullest(self, limit: float) -> None:
        """While the step stays within ``limit``: a table on the fullest rank moves to its
        cheapest option with smaller shards, if that lowers the objective."""
        options = self.s.options
        while self.s.budget_left():
            load = self.placement.load
            fullest = max(range(len(load.hbm)), key=lambda r: (max(load.hbm[r], load.ddr[r]), -r))
            improved = False
            for i in self._tables_on(fullest):
                current = options[i][self.choice[i]]
                k = next(
                    (
                        k
                        for k, o in enumerate(options[i])
                        if o.max_shard_storage < current.max_shard_storage
                    ),
                    None,
                )
                if k is None or not self.s.budget_left():
                    continue
                result = self._try(i, k)
                if (
                    result is not None
                    and result.max_perf <= limit
                    and objective(result) < objective(self.placement)
                ):
                    self.choice[i], self.placement = k, result
                    self.reasons[i] = (
                        f"{_label(options[i][k])}: less memory on the fullest rank than "
                        f"{_label(current)}, the step within {STEP_TOLERANCE:.0%}"
                    )
                    improved = True
                    break
            if not improved:
                return

    def _heaviest_on(self, rank: int) -> list[int]:
        """The LOCAL_TABLES tables that take most of ``rank``'s time."""
        spent: dict[int, float] = {}
        for i, option in enumerate(self.placement.options):
            for shard in option.shards:
                if shard.rank == rank:
                    spent[i] = spent.get(i, 0.0) + shard.perf
        return sorted(spent, key=lambda i: (-spent[i], i))[:LOCAL_TABLES]

    def speed_up(self, max_sent: float) -> None:
        """While the busiest rank sends at most ``max_sent`` bytes across hosts: a table on the
        slowest rank moves to the option (tried from the cheapest in total time) that makes the
        step faster, its host groups placed where they keep the step and spread what crosses
        hosts (the partitioner's ``target_step``)."""
        options = self.s.options
        while self.s.budget_left():
            load = self.placement.load
            step = load.step
            moved = False
            for i in self._heaviest_on(load.slowest):
                current = options[i][self.choice[i]]
                for k in range(len(options[i])):
                    # Only lighter shards can make the slowest rank faster.
                    if (
                        options[i][k].max_shard_perf >= current.max_shard_perf
                        or not self.s.budget_left()
                    ):
                        continue
                    result = self._try(i, k, step)
                    if result is None or result.max_perf >= step * (1 - STEP_TOLERANCE):
                        continue
                    j, kj = -1, -1
                    if max(result.load.sent_inter) > max_sent:
                        # Faster but sends too much: another table on the busiest sender split
                        # over other hosts may even the hosts out again.
                        pair = self._evening(i, k, result, step * (1 - STEP_TOLERANCE), max_sent)
                        if pair is None:
                            continue
                        j, kj, result = pair
                    self.reasons[i] = (
                        f"{_label(options[i][k])}: a faster step than {_label(current)} "
                        f"({_ms(result.max_perf)} vs {_ms(step)}) with at most "
                        f"{max_sent / 1e6:.1f} MB sent across hosts by any rank"
                    )
                    self.choice[i], self.placement = k, result
                    if j >= 0:
                        self.reasons[j] = (
                            f"{_label(options[j][kj])}: spreads what crosses hosts evenly beside "
                            f"{options[i][k].table.fqn}'s {_label(options[i][k])}"
                        )
                        self.choice[j] = kj
                    moved = True
                    break
                if moved:
                    break
            if not moved:
                return

    def _evening(
        self, i: int, k: int, moved: Placement, below: float, max_sent: float
    ) -> tuple[int, int, Placement] | None:
        """With table ``i`` on option ``k`` (placed as ``moved``): a table on the rank that sends
        most across hosts, on another host-grouped option, that brings the busiest rank within
        ``max_sent`` with the step below ``below``; the first found."""
        options = self.s.options
        sent = moved.load.sent_inter
        busiest = max(range(len(sent)), key=lambda r: (sent[r], -r))
        sends: dict[int, float] = {}
        for j, option in enumerate(moved.options):
            for shard in option.shards:
                if shard.rank == busiest and j != i:
                    sends[j] = sends.get(j, 0.0) + shard.cost.from_owner
        for j in sorted(sends, key=lambda j: (-sends[j], j))[:LOCAL_TABLES]:
            for kj, option in enumerate(options[j]):
                # A table split over two hosts fills what the move left half empty.
                if (
                    kj == self.choice[j]
                    or not option.one_host
                    or len(set(option.host_groups)) > 2
                    or not self.s.budget_left()
                ):
                    continue
                trial = list(self.choice)
                trial[i], trial[j] = k, kj
                result = self.s.place(trial, below)
                if (
                    isinstance(result, Placement)
                    and result.max_perf < below
                    and max(result.load.sent_inter) <= max_sent
                ):
                    return j, kj, result
        return None


def _bytes_across_hosts(option: ShardingOption, world: int, remote: int) -> float:
    """Bytes an option sends across hosts per step in all, its placement aside: each shard's
    exchange with the ``remote`` ranks off its host (both ways), a replica's all-reduce on every
    rank."""
    total = 0.0
    for shard in option.shards:
        c = shard.cost
        total += remote * (c.to_owner + c.from_owner)
    if option.shards and option.shards[0].cost.allreduce_inter:
        total += world * option.shards[0].cost.allreduce_inter
    return total
