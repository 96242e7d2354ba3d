"""Calibrates the planner's per-byte costs on this machine (gloo, CPU) and compares its estimated
step with measured DistributedModelParallel steps of 2 and 4 processes.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/planner_calibrate.py

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/planner_calibrate.py \
        --sharding "" table_wise row_wise

For each process count W (2 and 4):

1. Per-byte costs, measured on W gloo processes (1 thread each; on this 2-core machine 4 processes
   share the cores, and the costs are what that sharing leaves a rank): the fused lookup
   (embedding bytes read per second forward, and backward with the fused SGD update / forward),
   the all-to-all (bytes each rank sends per second, 8 MiB tensors), the all-reduce (bytes of
   the tensor per second) and the reduce-scatter row-wise sums its partial outputs with (bytes
   each rank must send per second).
2. A CPU Topology with those figures (``ddr_mem_bw``, ``intra_host_bw`` = ``inter_host_bw``,
   ``bwd_compute_multiplier``, ``reduce_scatter_bw``) and the planner plans an
   EmbeddingBagCollection (8 tables of 200,000 x 64, 4 ids per sample, batch 2048 per rank, fused
   SGD), by its own choice or with every
   table forced to one ``--sharding`` type; the plan runs under DistributedModelParallel (loss: the
   sum of the pooled output).
3. The fixed cost per step: the same sharded module's step at 8 samples per rank, less the model's
   estimate for it (its estimate at 2048 scaled down: every byte these sharding types move grows
   with the batch). It goes into the Topology as ``step_overhead`` and the planner plans again
   (the same plan: the overhead moves every plan alike); its estimated step is compared with the
   measured step at 2048 samples.

Every time is the slowest rank's median over 8 calls, best of 3 rounds (the machine is shared: the
best round is the one least disturbed); spread is the worst round over the best.
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
OVERHEAD_BATCH: Final = 8


def _median_seconds(fn: Any, warmup: int, iters: int, rounds: int = 3) -> tuple[float, float]:
    """The slowest rank's median seconds per call, best of ``rounds``; and the spread, the worst
    round over the best."""
    for _ in range(warmup):
        fn()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(iters):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        spent = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(spent, op=dist.ReduceOp.MAX)  # the slowest rank's median
        medians.append(float(spent))
    return min(medians), max(medians) / min(medians)


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


def _kjt(rank: int, batch: int) -> Any:
    from shardrec import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, ROWS, (TABLES * batch * POOLING,), generator=gen)
    lengths = torch.full((TABLES * batch,), POOLING, dtype=torch.int32)
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(TABLES)], values=ids, lengths=lengths)


def _costs(rank: int, world: int) -> dict[str, float]:
    ebc = _ebc(fused=False)
    kjt = _kjt(rank, BATCH)

    def forward() -> None:
        with torch.no_grad():
            ebc(kjt)

    def train() -> None:
        ebc(kjt).values().sum().backward()

    fwd = _median_seconds(forward, 3, 8)[0]
    both = _median_seconds(train, 3, 8)[0]
    read = TABLES * BATCH * POOLING * DIM * 4
    size = 8 * 2**20
    x = torch.randn(size // 4)
    part = size // 4 // world

    def a2a() -> None:
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, [part] * world, [part] * world)

    def allreduce() -> None:
        dist.all_reduce(x)

    def reduce_scatter() -> None:
        # What row-wise sends its partial sums with (comm.reduce_scatter_rows, equal blocks).
        out = torch.empty(size // 4 // world)
        # torch 2.13 renamed reduce_scatter_tensor (kept, deprecated); 2.11 has only the old name.
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn(out, x)

    a2a_s = _median_seconds(a2a, 3, 8)[0]
    ar_s = _median_seconds(allreduce, 3, 8)[0]
    rs_s = _median_seconds(reduce_scatter, 3, 8)[0]
    sent = size * (world - 1) / world
    return {
        "lookup_bytes_per_s": read / fwd,
        "bwd_over_fwd": (both - fwd) / fwd,
        "all_to_all_bytes_per_s": sent / a2a_s,
        "all_reduce_bytes_per_s": size / ar_s,
        # The bytes a reduce-scatter must send per rank, the same as the all-to-all's: a slower
        # figure is the backend's algorithm (Topology.reduce_scatter_bw).
        "reduce_scatter_bytes_per_s": sent / rs_s,
    }


def _topology(world: int, costs: dict[str, float], overhead: float = 0.0) -> Any:
    from shardrec.distributed.planner import Topology

    return Topology(
        world_size=world,
        compute_device="cpu",
        ddr_mem_bw=costs["lookup_bytes_per_s"],
        intra_host_bw=costs["all_to_all_bytes_per_s"],
        inter_host_bw=costs["all_to_all_bytes_per_s"],
        bwd_compute_multiplier=costs["bwd_over_fwd"],
        reduce_scatter_bw=costs["reduce_scatter_bytes_per_s"],
        step_overhead=overhead,
    )


def _plan(
    world: int, costs: dict[str, float], overhead: float, ebc: Any, sharding: str
) -> tuple[Any, Any]:
    from shardrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from shardrec.distributed.plugins import load_sharder_registry

    planner = EmbeddingShardingPlanner(
        _topology(world, costs, overhead),
        batch_size=BATCH,
        optimizer="sgd",
        constraints={
            f"t{i}": ParameterConstraints(
                pooling_factor=float(POOLING), sharding_types=[sharding] if sharding else None
            )
            for i in range(TABLES)
        },
    )
    plan = planner.collective_plan(ebc, load_sharder_registry().sharders())
    assert planner.last_report is not None
    return plan, planner.last_report


def _step(rank: int, world: int, costs: dict[str, float], sharding: str) -> dict[str, Any]:
    from shardrec.distributed import DistributedModelParallel
    from shardrec.distributed.plugins import load_sharder_registry

    ebc = _ebc(fused=True)
    plan, _ = _plan(world, costs, 0.0, ebc, sharding)
    if any(ps.sharding_type == "data_parallel" for t in plan.plan.values() for ps in t.values()):
        raise RuntimeError("a data-parallel table's all-reduce does not scale with the batch")
    model = DistributedModelParallel(ebc, plan=plan, sharders=load_sharder_registry().sharders())

    def step_of(batch: int) -> Any:
        kjt = _kjt(rank, batch)

        def step() -> None:
            model(kjt).values().sum().backward()

        return step

    # The fixed cost: the same plan and module at OVERHEAD_BATCH samples per rank, where bytes
    # hardly matter. Every per-step byte of these sharding types grows with the batch, so the
    # model's share of that tiny step is its step scaled down; the rest is the overhead.
    tiny, _ = _median_seconds(step_of(OVERHEAD_BATCH), 3, 8)
    measured, spread = _median_seconds(step_of(BATCH), 3, 8)
    _, bare = _plan(world, costs, 0.0, ebc, sharding)
    overhead = max(tiny - bare.step * OVERHEAD_BATCH / BATCH, 0.0)
    replan, report = _plan(world, costs, overhead, ebc, sharding)
    if replan.plan != plan.plan:
        raise RuntimeError("the fixed step overhead changed the plan; it should move all alike")
    kinds = sorted({ps.sharding_type for t in plan.plan.values() for ps in t.values()})
    return {
        "estimated": report.step,
        "estimated_without_overhead": report.step - overhead,
        "measured": measured,
        "spread": spread,
        "overhead": overhead,
        "types": kinds,
    }


def _worker(
    rank: int, world: int, port: int, costs: dict[str, float] | None, sharding: str, out: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result: dict[str, Any] = (
            _costs(rank, world) if costs is None else _step(rank, world, costs, sharding)
        )
    finally:
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.destroy_process_group()


def _run(world: int, costs: dict[str, float] | None, sharding: str = "") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(world, free_port(), costs, sharding, out), nprocs=world, join=True)
        result: dict[str, Any] = json.loads(Path(out).read_text())
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--sharding",
        nargs="+",
        default=[""],
        help="sharding types to force on every table, one run each ('' : the planner's choice)",
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(
        "| processes | lookup read (GB/s) | backward / forward | all-to-all (GB/s per rank) "
        "| all-reduce (GB/s) | reduce-scatter (GB/s per rank) | sharding | fixed (ms) "
        "| planner's step (ms) | measured step (ms) | spread | estimate / measured |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for world in args.ranks:
        # Costs measured on as many processes as the run: on this 2-core machine 4 processes share
        # the cores, and the per-byte costs a rank sees are what that sharing leaves it.
        costs = _run(world, None)
        for sharding in args.sharding:
            got = _run(world, costs, sharding)
            print(
                f"| {world} | {costs['lookup_bytes_per_s'] / 1e9:.2f} | "
                f"{costs['bwd_over_fwd']:.2f} | {costs['all_to_all_bytes_per_s'] / 1e9:.2f} | "
                f"{costs['all_reduce_bytes_per_s'] / 1e9:.2f} | "
                f"{costs['reduce_scatter_bytes_per_s'] / 1e9:.2f} | {', '.join(got['types'])} | "
                f"{got['overhead'] * 1e3:.1f} | {got['estimated'] * 1e3:.1f} | "
                f"{got['measured'] * 1e3:.1f} | {got['spread']:.2f} | "
                f"{got['estimated'] / got['measured']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
