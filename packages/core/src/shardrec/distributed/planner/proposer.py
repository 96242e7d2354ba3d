"""Searches proposals (one option per table) and keeps the placed one with the fastest slowest rank.

A proposal is made for a cap T on the time of any one shard: each table takes its cheapest option
(in total step time) whose slowest shard stays within T, or its fastest-shard option if none does.
Every distinct shard time of every option is tried as T, from loose to tight (so the first proposal
is each table's cheapest option). A proposal that does not fit is repaired: the table that found no
room moves to its next option with smaller shards, until it fits or runs out of options. Of the
proposals that fit, the best has the fastest slowest rank, then the least memory on the fullest
rank, then the least total time. Each choice records why, for the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardrec.distributed.planner.partitioner import (
    FixedLoads,
    Placement,
    PlacementFailure,
    partition,
)
from shardrec.distributed.planner.topology import Topology
from shardrec.distributed.planner.types import ShardingOption

# Tables of the slowest rank tried per step, heaviest first; bounds the cost of one step.
_TABLES_PER_STEP = 6


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


def _score(p: Placement) -> tuple[float, int, float, int]:
    perf = p.load.perf
    worst = max(perf)
    at_worst = sum(1 for x in perf if x >= worst * (1 - 1e-9))
    return (worst, at_worst, sum(perf), max(max(p.load.hbm), max(p.load.ddr)))


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
    options: Sequence[Sequence[ShardingOption]], cap: float
) -> tuple[list[int], list[str]]:
    choice: list[int] = []
    reasons: list[str] = []
    for opts in options:
        k = next((k for k, o in enumerate(opts) if o.max_shard_perf <= cap), None)
        if k is None:
            k = min(range(len(opts)), key=lambda j: (opts[j].max_shard_perf, j))
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
    caps = sorted({o.max_shard_perf for opts in options for o in opts}, reverse=True)
    best: tuple[tuple[float, int, float], Placement, tuple[str, ...]] | None = None
    first_failure: tuple[PlacementFailure, ShardingOption] | None = None
    for cap in caps:
        if not s.budget_left():
            break
        choice, reasons = _capped_choice(options, cap)
        placement, failure = _fix(s, choice, reasons)
        if first_failure is None:
            first_failure = failure
        if placement is None:
            continue
        score = (
            placement.max_perf,
            max(max(placement.load.hbm), max(placement.load.ddr)),
            sum(placement.load.perf),
        )
        if best is None or score < best[0]:
            best = (score, placement, tuple(reasons))
    if best is None:
        return SearchResult(None, (), s.proposals, s.feasible, first_failure)
    return SearchResult(best[1], best[2], s.proposals, s.feasible, None)
