"""Searches proposals (one option per table) and keeps the placed one with the fastest step.

A proposal is made for a cap T on the time of any one shard: each table takes its cheapest option
(in total time, the bytes it makes every rank send included) whose slowest shard stays within T, or
its fastest-shard option if none does. Every distinct shard time of every option is tried as T,
from loose to tight (so the first proposal is each table's cheapest option). A proposal that does
not fit is repaired: the table that found no room moves to its next option with smaller shards,
until it fits or runs out of options. Each placed proposal is priced by the per-rank model
(``rank_model.py``): its step is the slowest rank's compute plus communication. Of the proposals
whose step is within STEP_TOLERANCE of the fastest, the best has the emptiest fullest rank, then the
fewest bytes sent across hosts by any one rank, then the fastest second-slowest rank, and so on.
Then, within that bound, tables on the fullest rank move to options with smaller shards and shards
move off the fullest rank. Each choice records why, for the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

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


@dataclass(frozen=True, slots=True)
class SearchResult:
    placement: Placement | None
    reasons: tuple[str, ...]
    proposals: int
    feasible: int
    failure: tuple[PlacementFailure, ShardingOption] | None


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
    ) -> None:
        self.options = options
        self.topology = topology
        self.reserved = reserved_fraction
        self.max_proposals = max_proposals
        self.loads = FixedLoads(topology.world_size)
        self.proposals = 0
        self.feasible = 0
        self.cache: dict[tuple[int, ...], Placement | PlacementFailure] = {}

    def place(self, choice: Sequence[int]) -> Placement | PlacementFailure:
        key = tuple(choice)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        self.proposals += 1
        proposal = [o[c] for o, c in zip(self.options, choice, strict=True)]
        result = partition(proposal, self.topology, self.reserved, self.loads)
        if isinstance(result, Placement):
            self.feasible += 1
        self.cache[key] = result
        return result

    def budget_left(self) -> bool:
        return self.proposals < self.max_proposals


def _fix(
    s: _Search, choice: list[int], reasons: list[str]
) -> tuple[Placement | None, tuple[PlacementFailure, ShardingOption] | None]:
    """Place ``choice``, moving tables that find no room to smaller options; None if it cannot
    fit."""
    options = s.options
    first_failure: tuple[PlacementFailure, ShardingOption] | None = None
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
            return None, first_failure
        choice[i] = nxt
        detail = result.describe(current).split(" needs ", 1)[1]
        reasons[i] = f"{_label(options[i][nxt])}: {_label(current)} did not fit (needs {detail})"
        result = s.place(choice)
    return result, first_failure


def _capped_choice(
    options: Sequence[Sequence[ShardingOption]],
    max_perf: Sequence[Sequence[float]],
    cap: float,
) -> tuple[list[int], list[str]]:
    choice: list[int] = []
    reasons: list[str] = []
    for opts, perfs in zip(options, max_perf, strict=True):
        k = next((k for k, m in enumerate(perfs) if m <= cap), None)
        if k is None:
            k = min(range(len(opts)), key=lambda j: (perfs[j], j))
        choice.append(k)
        if k == 0:
            reasons.append(_initial_reason(opts))
        else:
            reasons.append(
                f"{_label(opts[k])}: the cheapest option whose slowest shard takes at most "
                f"{_ms(opts[k].max_shard_perf)} ({_label(opts[0])}, cheaper in total at "
                f"{_ms(opts[0].total_perf)}, would put {_ms(opts[0].max_shard_perf)} on one rank)"
            )
    return choice, reasons


def search(
    options: Sequence[Sequence[ShardingOption]],
    topology: Topology,
    reserved_fraction: float,
    max_proposals: int,
) -> SearchResult:
    s = _Search(options, topology, reserved_fraction, max_proposals)
    max_perf = [[o.max_shard_perf for o in opts] for opts in options]
    caps = sorted({m for perfs in max_perf for m in perfs}, reverse=True)
    found: list[tuple[Placement, tuple[str, ...], tuple[int, ...]]] = []
    first_failure: tuple[PlacementFailure, ShardingOption] | None = None
    for cap in caps:
        if not s.budget_left():
            break
        choice, reasons = _capped_choice(options, max_perf, cap)
        placement, failure = _fix(s, choice, reasons)
        if first_failure is None:
            first_failure = failure
        if placement is not None:
            found.append((placement, tuple(reasons), tuple(choice)))
    if not found:
        return SearchResult(None, (), s.proposals, s.feasible, first_failure)
    # Steps within STEP_TOLERANCE of the fastest are ties: the fullest rank decides, then the most
    # bytes any rank sends across hosts (the scarcest link), then the slowest ranks one after the
    # other (so the ranks behind the bottleneck are balanced too).
    limit = min(f[0].max_perf for f in found) * (1 + STEP_TOLERANCE)
    picked, why, picked_choice = min(
        (f for f in found if f[0].max_perf <= limit),
        key=lambda f: (
            f[0].max_memory,
            max(f[0].load.sent_inter),
            tuple(sorted(f[0].load.perf, reverse=True)),
        ),
    )
    s.max_proposals += 2 * len(options)
    shrunk, why = _shrink_fullest(s, list(picked_choice), picked, list(why), limit)
    shards = sum(len(o.shards) for o in shrunk.options)
    balanced = rebalance_memory(shrunk, topology, reserved_fraction, shards, limit)
    return SearchResult(balanced, why, s.proposals, s.feasible, None)


def _shrink_fullest(
    s: _Search, choice: list[int], placement: Placement, reasons: list[str], limit: float
) -> tuple[Placement, tuple[str, ...]]:
    """While the step stays within ``limit``: a table on the fullest rank moves to its cheapest
    option with smaller shards, if that empties the fullest rank."""
    options = s.options
    while s.budget_left():
        load = placement.load
        fullest = max(range(len(load.hbm)), key=lambda r: (max(load.hbm[r], load.ddr[r]), -r))
        held: dict[int, int] = {}
        for i, option in enumerate(placement.options):
            for shard in option.shards:
                if shard.rank == fullest:
                    held[i] = held.get(i, 0) + shard.storage
        improved = False
        for i in sorted(held, key=lambda i: (-held[i], i)):
            current = options[i][choice[i]]
            k = next(
                (
                    k
                    for k, o in enumerate(options[i])
                    if o.max_shard_storage < current.max_shard_storage
                ),
                None,
            )
            if k is None or not s.budget_left():
                continue
            trial = list(choice)
            trial[i] = k
            result = s.place(trial)
            if (
                isinstance(result, Placement)
                and result.max_perf <= limit
                and result.max_memory < placement.max_memory
            ):
                choice, placement = trial, result
                reasons[i] = (
                    f"{_label(options[i][k])}: less memory on the fullest rank than "
                    f"{_label(current)}, the step within {STEP_TOLERANCE:.0%}"
                )
                improved = True
                break
        if not improved:
            break
    return placement, tuple(reasons)
