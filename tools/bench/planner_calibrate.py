"""Calibrates the planner's per-byte costs on this machine (gloo, CPU) and compares its estimated
step with measured DistributedModelParallel steps of 2 and 4 processes.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/planner_calibrate.py

1. Per-byte costs, measured on 2 gloo processes (1 thread each): the fused lookup (embedding bytes
   read per second forward, and backward / forward), the all-to-all (bytes each rank sends per
   second) and the all-reduce (bytes of the tensor per second).
2. A Topology with those figures (``compute_device="cpu"``: ``ddr_mem_bw``, ``intra_host_bw``,
   ``bwd_compute_multiplier``), the planner plans an EmbeddingBagCollection (8 tables of
   200,000 x 64, 4 ids per sample, batch 2048 per rank, fused SGD) for 2 and 4 ranks; the plan is
   run under DistributedModelParallel (loss: the sum of the pooled output) and the step is compared
   with the planner's estimated step.

Every time is the slowest rank's median over 8 calls, best of 3 rounds (the machine is shared: the
best round is the one least disturbed). On this 2-core machine 4 processes share 2 cores: the
   measured step then also pays for the sharing, which the model does not know about.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import free_port

ROWS: Final = 200_000
DIM: Final = 64
TABLES: Final = 8
POOLING: Final = 4
BATCH: Final = 2048


def _median_seconds(fn: Any, warmup: int, iters: int, rounds: int = 3) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(iters):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        spent = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(spent, op=dist.ReduceOp.MAX)  # the slowest rank's median
        best = min(best, float(spent))
    return best


def _ebc(fused: bool) -> Any:
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig

    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t{i}", num_embeddings=ROWS, embedding_dim=DIM, feature_names=[f"f{i}"]
            )
            for i in range(TABLES)
        ],
        device="meta" if fused else "cpu",
        fused_params={"optimizer": "sgd", "learning_rate": 0.01},
    )


def _kjt(rank: int) -> Any:
    from shardrec import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, ROWS, (TABLES * BATCH * POOLING,), generator=gen)
    lengths = torch.full((TABLES * BATCH,), POOLING, dtype=torch.int32)
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(TABLES)], values=ids, lengths=lengths)


def _costs(rank: int, world: int) -> dict[str, float]:
    ebc = _ebc(fused=False)
    kjt = _kjt(rank)

    def forward() -> None:
        with torch.no_grad():
            ebc(kjt)

    def train() -> None:
        ebc(kjt).values().sum().backward()

    fwd = _median_seconds(forward, 3, 8)
    both = _median_seconds(train, 3, 8)
    read = TABLES * BATCH * POOLING * DIM * 4
    size = 8 * 2**20
    x = torch.randn(size // 4)
    part = size // 4 // world

    def a2a() -> None:
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, [part] * world, [part] * world)

    def allreduce() -> None:
        dist.all_reduce(x)

    a2a_s = _median_seconds(a2a, 3, 8)
    ar_s = _median_seconds(allreduce, 3, 8)
    sent = size * (world - 1) / world
    return {
        "lookup_bytes_per_s": read / fwd,
        "bwd_over_fwd": (both - fwd) / fwd,
        "all_to_all_bytes_per_s": sent / a2a_s,
        "all_reduce_bytes_per_s": size / ar_s,
    }


def _topology(world: int, costs: dict[str, float]) -> Any:
    from shardrec.distributed.planner import Topology

    return Topology(
        world_size=world,
        compute_device="cpu",
        ddr_mem_bw=costs["lookup_bytes_per_s"],
        intra_host_bw=costs["all_to_all_bytes_per_s"],
        inter_host_bw=costs["all_to_all_bytes_per_s"],
        bwd_compute_multiplier=costs["bwd_over_fwd"],
    )


def _step(rank: int, world: int, costs: dict[str, float]) -> dict[str, Any]:
    from shardrec.distributed import DistributedModelParallel
    from shardrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from shardrec.distributed.plugins import load_sharder_registry

    ebc = _ebc(fused=True)
    planner = EmbeddingShardingPlanner(
        _topology(world, costs),
        batch_size=BATCH,
        optimizer="sgd",
        constraints={
            f"t{i}": ParameterConstraints(pooling_factor=float(POOLING)) for i in range(TABLES)
        },
    )
    sharders = load_sharder_registry().sharders()
    plan = planner.collective_plan(ebc, sharders)
    assert planner.last_report is not None
    model = DistributedModelParallel(ebc, plan=plan, sharders=sharders)
    kjt = _kjt(rank)

    def step() -> None:
        model(kjt).values().sum().backward()

    measured = _median_seconds(step, 3, 8)
    kinds = sorted({ps.sharding_type for t in plan.plan.values() for ps in t.values()})
    return {"estimated": planner.last_report.step, "measured": measured, "types": kinds}


def _worker(rank: int, world: int, port: int, costs: dict[str, float] | None, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result: dict[str, Any] = _costs(rank, world) if costs is None else _step(rank, world, costs)
    finally:
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.destroy_process_group()


def _run(world: int, costs: dict[str, float] | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(world, free_port(), costs, out), nprocs=world, join=True)
        result: dict[str, Any] = json.loads(Path(out).read_text())
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    costs = _run(2, None)
    gbs = {k: v / 1e9 for k, v in costs.items()}
    print(
        f"lookup {gbs['lookup_bytes_per_s']:.2f} GB/s read, backward "
        f"{costs['bwd_over_fwd']:.2f}x forward; all-to-all {gbs['all_to_all_bytes_per_s']:.2f} "
        f"GB/s sent per rank; all-reduce {gbs['all_reduce_bytes_per_s']:.2f} GB/s"
    )
    print(
        "| processes | sharding types | planner's step (ms) | measured step (ms) "
        "| estimate / measured |"
    )
    print("|---|---|---|---|---|")
    for world in args.ranks:
        got = _run(world, costs)
        print(
            f"| {world} | {', '.join(got['types'])} | {got['estimated'] * 1e3:.1f} | "
            f"{got['measured'] * 1e3:.1f} | {got['estimated'] / got['measured']:.2f} |"
        )


if __name__ == "__main__":
    main()
