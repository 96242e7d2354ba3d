"""Plan quality: shardrec's planner beside TorchRec's on the MLPerf DLRM-DCNv2 tables, judged by one
neutral model written here once (neither planner's own estimates are used).

Workload: 26 tables with the Criteo 1TB cardinalities capped at 40M rows, dimension 128, the MLPerf
multi-hot pooling factors, 8,192 samples per rank, ranks of 80 GB (8 per host), fused row-wise
Adagrad; 8, 64 and 512 ranks. Each planner plans with its own built-in sharders; TorchRec 1.8.0 runs
in ``.venv-peer`` (``make bench-peer``): this script re-runs itself there with ``--peer``.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/planner_quality.py [--ranks 8 64]

The neutral model, per rank and per step (B samples per rank, W ranks, L per host, H = W/L hosts,
P a table's pooling factor, N its rows, D = 128, fp32, 8-byte ids; ids fall evenly over rows):

- memory: each shard's weights (rows x cols x 4) and row-wise Adagrad state (rows x 4); a
  data-parallel replica adds its dense gradient (N x D x 4);
- rows read: embedding bytes looked up, W x B x P x rows/N x cols x 4 per shard (data-parallel:
  its own B x P x D x 4);
- bytes sent, inside the host and across hosts, by the collective each sharding type runs:
  table-wise, column-wise, row-wise: every rank sends each shard the ids that fall in its rows
  (8 x B x P x rows/N) and, backward, its output gradient (B x cols x 4; row-wise B x D x 4); the
  owner sends every rank its output (B x cols x 4; row-wise partial sums B x D x 4);
  table-column-wise (column slices on the ranks of one host) as column-wise;
  table-row-wise (rows over the L ranks of one host): ids as row-wise; the owners reduce-scatter
  the partial sums inside the host ((L-1)/L x W x B x D x 4 each) and each sends its rows to the
  ranks of its local rank on the other hosts (B x D x 4 each); backward the reverse; grid (column
  slices, one host each, rows split there): each slice as a table-row-wise table of its columns;
  data-parallel: a two-level all-reduce of the gradient, 2(L-1)/L x S inside, 2(H-1)/H x S/L across.
- received bytes across hosts are counted too (an owner that every rank sends ids to receives
  far more than it sends).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

CRITEO_1TB_40M: Final = [
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
]  # fmt: skip
POOLING: Final = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
DIM: Final = 128
BATCH: Final = 8192
LOCAL: Final = 8
HBM: Final = 80 * 10**9
E: Final = 4  # fp32
ID: Final = 8  # int64 ids

# A plan, neutrally: table name -> (sharding type, [(row_offset, col_offset, rows, cols, rank)]).
Plan = dict[str, tuple[str, list[tuple[int, int, int, int, int]]]]


# -- the two planners ----------------------------------------------------------------------------


def plan_shardrec(world: int, without: frozenset[str] = frozenset()) -> tuple[Plan, float, float]:
    import torch

    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig
    from shardrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )
    from shardrec.distributed.plugins import load_sharder_registry

    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", num_embeddings=n, embedding_dim=DIM, feature_names=[f"f{i}"]
        )
        for i, n in enumerate(CRITEO_1TB_40M)
    ]
    # Fused row-wise Adagrad (MLPerf's own rule is exact Adagrad); the data-parallel sharder applies
    # it to replicas, so the planner may make small tables data-parallel.
    fused = {"optimizer": "rowwise_adagrad"}
    ebc = EmbeddingBagCollection(tables, device=torch.device("meta"), fused_params=fused)
    constraints = {
        f"t{i}": ParameterConstraints(pooling_factor=float(p)) for i, p in enumerate(POOLING)
    }
    planner = EmbeddingShardingPlanner(
        Topology(world_size=world, local_world_size=LOCAL, hbm_cap=HBM),
        batch_size=BATCH,
        constraints=constraints,
        optimizer="rowwise_adagrad",
    )
    sharders = [
        s for s in load_sharder_registry().sharders() if not set(s.sharding_types("cuda")) & without
    ]
    start, cpu = time.perf_counter(), time.process_time()
    plan = planner.plan(ebc, sharders)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    out: Plan = {}
    for name, ps in plan.plan[""].items():
        out[name] = (
            ps.sharding_type,
            [(*s.offsets, *s.sizes, s.rank) for s in ps.shards],
        )
    return out, seconds, cpu


def plan_torchrec(world: int) -> tuple[Plan, float, float]:  # runs in .venv-peer
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )

    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", num_embeddings=n, embedding_dim=DIM, feature_names=[f"f{i}"]
        )
        for i, n in enumerate(CRITEO_1TB_40M)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    sharder = EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
    )
    constraints = {
        f"t{i}": ParameterConstraints(pooling_factors=[float(p)]) for i, p in enumerate(POOLING)
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(
            world_size=world, compute_device="cuda", hbm_cap=HBM, local_world_size=LOCAL
        ),
        batch_size=BATCH,
        constraints=constraints,
    )
    start, cpu = time.perf_counter(), time.process_time()
    plan = planner.plan(ebc, [sharder])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    out: Plan = {}
    for name, ps in plan.plan[""].items():
        n = CRITEO_1TB_40M[int(name[1:])]
        if ps.sharding_spec is None:  # data-parallel: a whole replica on every rank
            out[name] = (ps.sharding_type, [(0, 0, n, DIM, r) for r in ps.ranks or []])
            continue
        shards = [
            (*s.shard_offsets, *s.shard_sizes, s.placement.rank()) for s in ps.sharding_spec.shards
        ]
        out[name] = (ps.sharding_type, shards)
    return out, seconds, cpu


# -- the neutral model ---------------------------------------------------------------------------


@dataclass
class Figures:
    memory: np.ndarray
    read: np.ndarray
    sent_intra: np.ndarray
    sent_inter: np.ndarray
    recv_inter: np.ndarray
    used: int


class _Traffic:
    def __init__(self, world: int) -> None:
        self.w = world
        self.host = np.arange(world) // LOCAL
        self.sent = {"intra": np.zeros(world), "inter": np.zeros(world)}
        self.recv = {"intra": np.zeros(world), "inter": np.zeros(world)}

    def all_to_owner(self, owner: int, each: float) -> None:
        """Every other rank sends ``each`` bytes to ``owner``."""
        same = self.host == self.host[owner]
        others = np.arange(self.w) != owner
        self.sent["intra"][same & others] += each
        self.sent["inter"][~same] += each
        self.recv["intra"][owner] += each * (int(same.sum()) - 1)
        self.recv["inter"][owner] += each * int((~same).sum())

    def owner_to_all(self, owner: int, each: float) -> None:
        same = self.host == self.host[owner]
        others = np.arange(self.w) != owner
        self.recv["intra"][same & others] += each
        self.recv["inter"][~same] += each
        self.sent["intra"][owner] += each * (int(same.sum()) - 1)
        self.sent["inter"][owner] += each * int((~same).sum())

    def pairs(self, src: np.ndarray, dst: np.ndarray, each: float) -> None:
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            kind = "intra" if self.host[s] == self.host[d] else "inter"
            self.sent[kind][s] += each
            self.recv[kind][d] += each


def judge(plan: Plan, world: int) -> Figures:
    hosts = world // LOCAL
    memory = np.zeros(world)
    read = np.zeros(world)
    traffic = _Traffic(world)
    for name, (kind, shards) in plan.items():
        i = int(name[1:])
        n, p = CRITEO_1TB_40M[i], POOLING[i]
        if kind == "data_parallel":
            size = n * DIM * E
            for *_, rank in shards:
                memory[rank] += 2 * size + n * 4
                read[rank] += BATCH * p * DIM * E
            for k in ("intra", "inter"):
                part = (
                    2 * (LOCAL - 1) / LOCAL * size
                    if k == "intra"
                    else 2 * (hosts - 1) / hosts * size / LOCAL
                )
                traffic.sent[k] += part
                traffic.recv[k] += part
            continue
        for _r0, _c0, rows, cols, rank in shards:
            share = rows / n
            memory[rank] += rows * cols * E + rows * 4
            read[rank] += world * BATCH * p * share * cols * E
            traffic.all_to_owner(rank, ID * BATCH * p * share)
            if kind in ("table_row_wise", "grid_shard"):
                # Grid: each column slice is a table-row-wise table of its columns.
                full = world * BATCH * cols * E
                reduce = (LOCAL - 1) / LOCAL * full  # reduce-scatter forward, all-gather backward
                traffic.sent["intra"][rank] += 2 * reduce
                traffic.recv["intra"][rank] += 2 * reduce
                local_rank = rank % LOCAL
                peers = np.array(
                    [m * LOCAL + local_rank for m in range(hosts) if m != rank // LOCAL], dtype=int
                )
                row = BATCH * cols * E
                traffic.pairs(np.full(len(peers), rank), peers, row)  # pooled rows out
                traffic.pairs(peers, np.full(len(peers), rank), row)  # their gradients back
            else:
                width = DIM if kind == "row_wise" else cols
                traffic.owner_to_all(rank, BATCH * width * E)  # outputs (partial sums)
                traffic.all_to_owner(rank, BATCH * width * E)  # their gradients
    return Figures(
        memory,
        read,
        traffic.sent["intra"],
        traffic.sent["inter"],
        traffic.recv["inter"],
        used=int((memory > 0).sum()),
    )


# -- the report ----------------------------------------------------------------------------------


def _row(world: int, who: str, f: Figures, seconds: tuple[float, float], kinds: str) -> str:
    return (
        f"| {world} | {who} | {f.memory.max() / 1e9:.1f} / {f.memory.mean() / 1e9:.1f} | "
        f"{f.read.max() / 1e9:.2f} ({f.read.max() / f.read.mean():.1f}x mean) | "
        f"{f.sent_inter.max() / 1e6:.0f} | {f.sent_intra.max() / 1e6:.0f} | "
        f"{f.recv_inter.max() / 1e6:.0f} | {f.used} | {seconds[0]:.2f} / {seconds[1]:.2f} | "
        f"{kinds} |"
    )


def _kinds(plan: Plan) -> str:
    counts: dict[str, int] = {}
    for kind, _ in plan.values():
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument(
        "--without",
        nargs="*",
        default=[],
        help="sharding types whose sharders shardrec's planner may not use (e.g. table_row_wise)",
    )
    parser.add_argument("--no-peer", action="store_true", help="shardrec's side only")
    parser.add_argument(
        "--peer", action="store_true", help="(internal) plan with TorchRec, print JSON"
    )
    args = parser.parse_args()
    if args.peer:
        print(json.dumps({w: plan_torchrec(w) for w in args.ranks}))
        return

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from common import peer_available, run_peer

    theirs: dict[str, Any] = {}
    if not args.no_peer and peer_available():
        out = run_peer([__file__, "--peer", "--ranks", *map(str, args.ranks)])
        theirs = json.loads(out.strip().splitlines()[-1])
    elif not args.no_peer:
        print("(no .venv-peer: run `make bench-peer` for TorchRec's side)")
    print(
        "| ranks | planner | memory max / mean (GB) | rows read, busiest rank (GB) | "
        "sent across hosts, busiest (MB) | sent in host, busiest (MB) | "
        "received across hosts, busiest (MB) | ranks used | plan wall / CPU (s) | sharding types |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for world in args.ranks:
        ours, seconds, cpu = plan_shardrec(world, frozenset(args.without))
        mine = judge(ours, world)
        print(_row(world, "shardrec", mine, (seconds, cpu), _kinds(ours)))
        if str(world) in theirs:
            plan, their_seconds, their_cpu = theirs[str(world)]
            plan = {k: (v[0], [tuple(s) for s in v[1]]) for k, v in plan.items()}
            peer = judge(plan, world)
            print(_row(world, "TorchRec", peer, (their_seconds, their_cpu), _kinds(plan)))
            verdicts.append(
                f"{world} ranks, shardrec / TorchRec on the busiest rank: memory "
                f"{mine.memory.max() / peer.memory.max():.2f}x, rows read "
                f"{mine.read.max() / peer.read.max():.2f}x, sent across hosts "
                f"{mine.sent_inter.max() / max(peer.sent_inter.max(), 1):.2f}x, received across "
                f"hosts {mine.recv_inter.max() / max(peer.recv_inter.max(), 1):.2f}x"
            )
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
