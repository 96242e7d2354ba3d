"""Where a training step's time goes: torch.profiler operator totals, shardrec beside TorchRec.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 \\
        .venv-peer/bin/python tools/bench/profile_step.py --workload dlrm
    # --workload dmp: the table-wise DMP step of dmp.py on 2 processes (rank 0's profile)
    # --workload dlrm2: the DLRM step of dlrm.py on 2 processes (rank 0's profile)

The steps are the ones ``dlrm.py`` and ``dmp.py`` time (same models, plans and batches). Runs in
``.venv-peer``, where both libraries are installed. ``dlrm``: one process, 1 intra-op thread, the
two libraries built in the same process and profiled in alternating rounds. ``dmp`` and
``dlrm2``: two gloo processes, 1 thread each, one library after the other. Printed: milliseconds
per step of each operator's self CPU time (the profiler's clock: waiting inside a collective
counts), the largest first, and their sum; plus each side's wall and CPU time per step outside the
profiler.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import free_port
from torch.profiler import ProfilerActivity, profile


def _totals(step: Any, batches: list[Any], steps: int) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(*batches[i % len(batches)])
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def _timed(step: Any, batches: list[Any], steps: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return (time.perf_counter() - wall) * 1e3 / steps, (time.process_time() - cpu) * 1e3 / steps


def _print(
    totals: dict[str, dict[str, float]], timed: dict[str, tuple[float, float]], top: int
) -> None:
    names = list(totals)
    ops = sorted(
        set().union(*totals.values()), key=lambda k: -max(t.get(k, 0.0) for t in totals.values())
    )
    print(f"{'operator (self CPU ms per step)':52}" + "".join(f"{n:>12}" for n in names))
    for op in ops[:top]:
        print(f"{op[:52]:52}" + "".join(f"{totals[n].get(op, 0.0):12.2f}" for n in names))
    print(
        f"{'sum of all operators':52}" + "".join(f"{sum(totals[n].values()):12.2f}" for n in names)
    )
    for n in names:
        print(f"{n}: {timed[n][0]:.1f} ms wall, {timed[n][1]:.1f} ms CPU per step (unprofiled)")


def _dlrm(args: Any) -> None:
    import dlrm

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
        LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    steps = {
        "shardrec": dlrm._shardrec_step(1, args.precision),
        "torchrec": dlrm._torchrec_step(1, args.precision),
    }
    batches = dlrm._synthetic_batches(0, 4)
    totals: dict[str, dict[str, float]] = {n: defaultdict(float) for n in steps}
    timed: dict[str, tuple[float, float]] = {}
    for step in steps.values():
        _timed(step, batches, args.warmup)
    for _ in range(args.rounds):
        for name, step in steps.items():
            timed[name] = min(timed.get(name, (1e9, 1e9)), _timed(step, batches, args.steps))
            for op, ms in _totals(step, batches, args.steps).items():
                totals[name][op] += ms / args.rounds
    _print(totals, timed, args.top)
    dist.destroy_process_group()


def _two_process_worker(
    rank: int, workload: str, impl: str, port: int, args: Any, queue: Any
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if workload == "dmp":
        import dmp

        step = (dmp._torchrec_step if impl == "torchrec" else dmp._shardrec_step)("tw", 2)
        batches = dmp._synthetic_batches(rank, 4)
    else:
        import dlrm

        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        )  # fmt: skip
        step = (dlrm._torchrec_step if impl == "torchrec" else dlrm._shardrec_step)(2)
        batches = dlrm._synthetic_batches(rank, 4)
    _timed(step, batches, args.warmup)
    dist.barrier()
    timed = _timed(step, batches, args.steps)
    totals = _totals(step, batches, args.steps)
    if rank == 0:
        queue.put((timed, totals))
    dist.destroy_process_group()


def _two_process(args: Any) -> None:
    totals: dict[str, dict[str, float]] = {}
    timed: dict[str, tuple[float, float]] = {}
    ctx = mp.get_context("spawn")
    for impl in ("shardrec", "torchrec"):
        queue = ctx.SimpleQueue()
        mp.start_processes(
            _two_process_worker, args=(args.workload, impl, free_port(), args, queue), nprocs=2,
            join=True, start_method="spawn",
        )  # fmt: skip
        timed[impl], totals[impl] = queue.get()
    _print(totals, timed, args.top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["dlrm", "dlrm2", "dmp"], default="dlrm")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="dlrm only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="dlrm: alternating rounds")
    parser.add_argument("--top", type=int, default=20, help="operators to print")
    args = parser.parse_args()
    try:
        import torchrec  # noqa: F401
    except ImportError:
        sys.exit(
            "profile_step.py needs TorchRec: run it with .venv-peer/bin/python (make bench-peer)"
        )
    (_dlrm if args.workload == "dlrm" else _two_process)(args)


if __name__ == "__main__":
    main()
