"""The planner's report: per rank (memory, estimated time, shards) and per table (sharding, why)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardrec.distributed.planner.partitioner import Placement
from shardrec.distributed.planner.rank_state import RankState, state_per_rank
from shardrec.distributed.planner.topology import GB, Topology
from shardrec.distributed.planner.types import ShardingOption
from shardrec.distributed.types import ShardingType


@dataclass(frozen=True, slots=True)
class TableReport:
    fqn: str
    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]
    shape: tuple[int, int]
    storage: int
    perf: float  # seconds per step on the slowest of its ranks
    why: str
    state: int = 0  # bytes that sharders keep for it beside its shards, all ranks together


@dataclass(frozen=True, slots=True)
class RankReport:
    """One rank in the per-rank model: storage, embedding bytes read per step, bytes sent per step
    inside its host and to other hosts, and its estimated step (``perf``: compute + ``comm``).
    ``state``: the part of its storage (HBM, or DDR on CPU) that sharders keep there besides the
    shards, such as managed tables' id maps (``rank_state.py``)."""

    rank: int
    hbm: int
    ddr: int
    perf: float
    shards: tuple[str, ...]
    read: float = 0.0
    sent_intra: float = 0.0
    sent_inter: float = 0.0
    compute: float = 0.0
    comm: float = 0.0
    state: int = 0


@dataclass(frozen=True, slots=True)
class PlanReport:
    """What the planner decided and why; ``str(report)`` is the human-readable form."""

    topology: Topology
    hbm_cap: int
    ddr_cap: int
    batch_size: int
    proposals: int
    feasible: int
    seconds: float
    ranks: tuple[RankReport, ...]
    tables: tuple[TableReport, ...]
    notes: tuple[str, ...] = ()

    @property
    def step(self) -> float:
        """The estimated step: the slowest rank's compute plus communication, in seconds."""
        return max(r.perf for r in self.ranks)

    def __str__(self) -> str:
        return format_report(self)


def _shard_label(option: ShardingOption, index: int) -> str:
    name = option.table.param_name
    if len(option.shards) == 1 or option.sharding_type == ShardingType.DATA_PARALLEL:
        return f"{name}[{option.sharding_type}]"
    return f"{name}[{option.sharding_type} {index}/{len(option.shards)}]"


def build_report(
    placement: Placement,
    reasons: tuple[str, ...],
    topology: Topology,
    caps: tuple[int, int],
    batch_size: int,
    proposals: int,
    feasible: int,
    seconds: float,
    notes: tuple[str, ...] = (),
    rank_state: Sequence[RankState] = (),
) -> PlanReport:
    """``rank_state``: what sharders keep on ranks besides the shards (already counted in the
    placement's per-rank storage), reported per rank and per table."""
    state = state_per_rank(rank_state, topology.world_size)
    table_state: dict[str, int] = {}
    for held in rank_state:
        table_state[held.table] = table_state.get(held.table, 0) + held.nbytes
    per_rank: list[list[str]] = [[] for _ in range(topology.world_size)]
    tables: list[TableReport] = []
    for option, why in zip(placement.options, reasons, strict=True):
        ranks: list[int] = []
        for k, shard in enumerate(option.shards):
            assert shard.rank is not None
            ranks.append(shard.rank)
            per_rank[shard.rank].append(_shard_label(option, k))
        tables.append(
            TableReport(
                fqn=option.table.fqn,
                sharding_type=option.sharding_type,
                compute_kernel=option.compute_kernel,
                ranks=tuple(ranks),
                shape=(option.table.num_embeddings, option.table.embedding_dim),
                storage=option.total_storage,
                perf=option.max_shard_perf,
                why=why,
                state=table_state.get(option.table.fqn, 0),
            )
        )
    load = placement.load
    ranks_out = tuple(
        RankReport(
            r,
            load.hbm[r],
            load.ddr[r],
            load.perf[r],
            tuple(per_rank[r]),
            read=load.read[r],
            sent_intra=load.sent_intra[r],
            sent_inter=load.sent_inter[r],
            compute=load.compute[r],
            comm=load.comm(r, topology),
            state=int(state[r]),
        )
        for r in range(topology.world_size)
    )
    return PlanReport(
        topology=topology,
        hbm_cap=caps[0],
        ddr_cap=caps[1],
        batch_size=batch_size,
        proposals=proposals,
        feasible=feasible,
        seconds=seconds,
        ranks=ranks_out,
        tables=tuple(tables),
        notes=notes,
    )


def _ranks_text(ranks: tuple[int, ...], world_size: int) -> str:
    if len(ranks) == world_size and ranks == tuple(range(world_size)) and world_size > 4:
        return f"all {world_size}"
    if len(ranks) > 6:
        return ",".join(str(r) for r in ranks[:6]) + f",... ({len(ranks)})"
    return ",".join(str(r) for r in ranks)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def _step_line(report: PlanReport) -> str:
    slowest = max(report.ranks, key=lambda r: (r.perf, -r.rank))
    busy = sum(1 for r in report.ranks if r.shards)
    overhead = report.topology.step_overhead
    fixed = f" + fixed {overhead * 1e3:.3f} ms" if overhead else ""
    return (
        f"estimated step: {slowest.perf * 1e3:.3f} ms on rank {slowest.rank} (compute "
        f"{slowest.compute * 1e3:.3f} ms + communication {slowest.comm * 1e3:.3f} ms{fixed}); "
        f"{busy} of {len(report.ranks)} ranks hold shards"
    )


def format_report(report: PlanReport, max_ranks: int = 64) -> str:
    t = report.topology
    # The state columns only where sharders keep state: other plans print as they always did.
    with_state = any(r.state for r in report.ranks)
    lines = [
        f"shardrec plan: {t.world_size} ranks ({t.ranks_per_host} per host) on {t.compute_device}, "
        f"batch {report.batch_size} per rank; usable per rank: HBM {report.hbm_cap / GB:.2f} GiB, "
        f"DDR {report.ddr_cap / GB:.2f} GiB",
        f"evaluated {report.proposals} proposal(s), {report.feasible} fit; "
        f"planned in {report.seconds:.2f} s",
        _step_line(report),
        *report.notes,
        "",
        "per rank (read: embedding bytes read per step; sent: bytes sent per step inside the "
        "host / to other hosts; step: compute + communication"
        + ("; state: what sharders keep beside the shards, such as id maps" if with_state else "")
        + "):",
    ]
    shown = report.ranks
    if len(shown) > max_ranks:
        # Many ranks: show the slowest and the fullest, which are the ones a reader checks.
        by_perf = sorted(shown, key=lambda r: (-r.perf, r.rank))[: max_ranks // 2]
        by_mem = sorted(shown, key=lambda r: (-(r.hbm + r.ddr), r.rank))[: max_ranks // 2]
        shown = tuple(
            sorted({r.rank: r for r in [*by_perf, *by_mem]}.values(), key=lambda r: r.rank)
        )
    rank_rows = [
        (
            str(r.rank),
            f"{r.hbm / GB:.3f}",
            f"{r.ddr / GB:.3f}",
            *((f"{r.state / GB:.3f}",) if with_state else ()),
            f"{r.read / 1e9:.3f}",
            f"{r.sent_intra / 1e6:.1f}",
            f"{r.sent_inter / 1e6:.1f}",
            f"{r.perf * 1e3:.3f}",
            " ".join(r.shards)
            if len(r.shards) <= 6
            else " ".join(r.shards[:6]) + f" ... ({len(r.shards)})",
        )
        for r in shown
    ]
    lines += _table(
        (
            "rank",
            "HBM (GiB)",
            "DDR (GiB)",
            *(("of which state (GiB)",) if with_state else ()),
            "read (GB)",
            "sent intra (MB)",
            "sent inter (MB)",
            "step (ms)",
            "shards",
        ),
        rank_rows,
    )
    if len(shown) < len(report.ranks):
        lines.append(
            f"({len(report.ranks) - len(shown)} ranks not shown: neither among the slowest "
            "nor the fullest)"
        )
    lines += ["", "per table:"]
    table_rows = [
        (
            tr.fqn,
            tr.sharding_type,
            tr.compute_kernel,
            _ranks_text(tr.ranks, t.world_size),
            f"{tr.shape[0]}x{tr.shape[1]}",
            f"{tr.storage / GB:.3f}",
            *((f"{tr.state / GB:.3f}",) if with_state else ()),
            f"{tr.perf * 1e3:.3f}",
        )
        for tr in report.tables
    ]
    lines += _table(
        (
            "table",
            "sharding",
            "kernel",
            "ranks",
            "shape",
            "storage (GiB)",
            *(("+ state (GiB)",) if with_state else ()),
            "time (ms)",
        ),
        table_rows,
    )
    lines += ["", "why:"]
    lines += [f"  {tr.fqn}: {tr.why}" for tr in report.tables]
    return "\n".join(lines)
