"""DistributedModelParallel training-step benchmark: shardrec against TorchRec 1.8.0, same run.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/dmp.py

Workload: an EmbeddingBagCollection of 26 tables with Criteo Kaggle's cardinalities
capped at 1,000,000 rows, dimension 64, one id per feature drawn uniformly, batch 4096 per rank,
under DistributedModelParallel with every table table-wise (spread round-robin over the ranks) or
every table row-wise, on 2 gloo processes on CPU. A training step is: forward of the sharded
EBC, a small dense over-arch (Linear 1664-256-1, DDP), BCE loss, backward with fused SGD for the
tables, torch SGD for the dense layers. Both sides build the same model and the same plan the way
their users do; TorchRec gets its optimizer through ``apply_optimizer_in_backward``.

TorchRec does not offer row-wise sharding on CPU; the script asks for
it anyway through a sharder that lists it, and prints ``n/a`` if TorchRec fails.

Also timed: the same shardrec step with ``check_inputs=False`` (the batch checks' cost: table- and
row-wise fold the check's flag into the split exchange of their input all-to-all), and the one
all-reduce that a data-parallel table's check adds per forward.

With ``--comm-precision fp16|bf16``, shardrec's step is also timed with the pooled outputs and their
gradients sent in that dtype, beside the fp32 step, with the output bytes each rank sends.

Printed: samples/s over all ranks, by wall clock (best window of ``--steps`` steps over
``--repeats`` windows and ``--rounds`` rounds that alternate shardrec and TorchRec) and per
CPU-second of the busiest rank (what a step costs on an idle machine: this machine is shared), and
the shardrec / TorchRec ratios (above 1: shardrec is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import MALLOC_ENV, free_port, keep_best, peer_available, run_peer

KAGGLE_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
ROWS = tuple(min(r, 1_000_000) for r in KAGGLE_ROWS)
DIM = 64
BATCH = 4096
LR = 0.01
FEATURES = [f"cat_{i}" for i in range(len(ROWS))]
_METRICS = ("samples_per_s", "samples_per_cpu_s")


def _synthetic_batches(rank: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of (ids [26 * BATCH] key-major, labels [BATCH]); one id per feature."""
    gen = torch.Generator().manual_seed(rank)
    return [
        (
            torch.cat([torch.randint(0, r, (BATCH,), generator=gen) for r in ROWS]),
            torch.randint(0, 2, (BATCH,), generator=gen).float(),
        )
        for _ in range(count)
    ]


def _over_arch() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM * len(ROWS), 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)
    )


class _Model(torch.nn.Module):
    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc
        self.over = _over_arch()

    def forward(self, kjt: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = self.over(self.ebc(kjt).values()).squeeze(1)
        loss: torch.Tensor = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return loss


def _shardrec_step(
    sharding: str, world: int, check_inputs: bool = True, comm_precision: str = "fp32"
) -> Any:
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from shardrec.distributed import DistributedModelParallel, ShardingPlan
    from shardrec.distributed.qcomm import QCommsConfig, with_qcomms
    from shardrec.distributed.sharding_plan import row_wise, table_wise

    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{f}", num_embeddings=r, embedding_dim=DIM, feature_names=[f]
            )
            for f, r in zip(FEATURES, ROWS, strict=True)
        ],
        device="meta",
        fused_params={"optimizer": "sgd", "learning_rate": LR},
        check_inputs=check_inputs,
    )
    plan = {
        f"t_{f}": table_wise(i % world, r, DIM) if sharding == "tw" else row_wise(r, DIM, world)
        for i, (f, r) in enumerate(zip(FEATURES, ROWS, strict=True))
    }
    qcomms = None if comm_precision == "fp32" else QCommsConfig.both(comm_precision)
    sharded_plan = with_qcomms(ShardingPlan({"ebc": plan}), qcomms)
    model = DistributedModelParallel(_Model(ebc), plan=sharded_plan)
    dense = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    lengths = torch.ones(len(FEATURES) * BATCH, dtype=torch.int32)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> None:
        loss = model(KeyedJaggedTensor(keys=FEATURES, values=ids, lengths=lengths), labels)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()

    def check_us(ids: torch.Tensor, calls: int = 50) -> float:
        """Median time of the sharded module's local batch check alone, flag read on the host
        included (table- and row-wise do not read it alone: it rides with the split exchange)."""
        sharded = model.module.ebc
        routed = sharded.router.route(KeyedJaggedTensor(keys=FEATURES, values=ids, lengths=lengths))
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            bool(sharded.guard.local_flag(routed))
            times.append(time.perf_counter() - start)
        return sorted(times)[calls // 2] * 1e6

    step.check_us = check_us  # type: ignore[attr-defined]
    return step


def _torchrec_step(sharding: str, world: int) -> Any:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import (
        construct_module_sharding_plan,
    )
    from torchrec.distributed.sharding_plan import (
        row_wise as tr_row_wise,
    )
    from torchrec.distributed.sharding_plan import (
        table_wise as tr_table_wise,
    )
    from torchrec.distributed.types import ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    class _AnySharder(EmbeddingBagCollectionSharder):  # type: ignore[misc]
        def sharding_types(self, compute_device_type: str) -> list[str]:
            return ["table_wise", "row_wise", "data_parallel", "column_wise"]

    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{f}", num_embeddings=r, embedding_dim=DIM, feature_names=[f]
            )
            for f, r in zip(FEATURES, ROWS, strict=True)
        ],
        device=torch.device("meta"),
    )
    model = _Model(ebc)
    apply_optimizer_in_backward(torch.optim.SGD, model.ebc.parameters(), {"lr": LR})
    sharder = _AnySharder()
    per_param = {
        f"t_{f}": tr_table_wise(rank=i % world) if sharding == "tw" else tr_row_wise()
        for i, f in enumerate(FEATURES)
    }
    module_plan = construct_module_sharding_plan(
        model.ebc, per_param, sharder=sharder, local_size=world, world_size=world,
        device_type="cpu",
    )  # fmt: skip
    dmp = DistributedModelParallel(
        model, device=torch.device("cpu"), plan=ShardingPlan({"ebc": module_plan}),
        sharders=[sharder],
    )  # fmt: skip
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.SGD(params, lr=LR),
    )
    lengths = torch.ones(len(FEATURES) * BATCH, dtype=torch.int32)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> None:
        loss = dmp(KeyedJaggedTensor(keys=FEATURES, values=ids, lengths=lengths), labels)
        dense.zero_grad()
        loss.backward()
        dense.step()

    return step


def _worker(
    rank: int, impl: str, sharding: str, world: int, port: int, args: Any, out: str
) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        if impl == "torchrec":
            step = _torchrec_step(sharding, world)
        else:
            precision = args.comm_precision if impl == "shardrec-comm" else "fp32"
            step = _shardrec_step(
                sharding, world, check_inputs=impl != "shardrec-unchecked", comm_precision=precision
            )
        batches = _synthetic_batches(rank, 4)
        for i in range(args.warmup):
            step(*batches[i % 4])
        windows, cpu = [], []
        for _ in range(args.repeats):
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                step(*batches[i % 4])
            spent = torch.tensor([time.process_time() - start_cpu], dtype=torch.float64)
            dist.barrier()
            windows.append(time.perf_counter() - start)
            # The busiest rank's CPU time: what the step costs on an otherwise idle machine.
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)
            cpu.append(float(spent))
        samples = BATCH * world * args.steps
        result: dict[str, Any] = {
            "samples_per_s": samples / min(windows),
            "samples_per_cpu_s": samples / min(cpu),
        }
        if impl.startswith("shardrec"):
            result["step_ms"] = min(windows) / args.steps * 1e3
        if impl == "shardrec":
            result["flag_all_reduce_us"] = _flag_all_reduce_us()
            result["check_us"] = step.check_us(batches[0][0])
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _flag_all_reduce_us(calls: int = 200) -> float:
    """Median time of the one collective a data-parallel table's batch check adds per forward
    (table-, row- and column-wise fold the check into their input all-to-all's split exchange)."""
    from shardrec.distributed import comm

    flag = torch.zeros((), dtype=torch.bool)
    group = dist.group.WORLD
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        comm.flagged_ranks(flag, group)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def output_bytes(sharding: str, world: int, element_size: int) -> int:
    """Bytes of pooled outputs one rank sends to its peers in a step, forward and backward alike:
    table-wise, ``BATCH`` rows of its tables' columns to each peer (rank 0, which owns the most
    tables); row-wise, ``BATCH`` rows of partial sums of every column to each peer."""
    tables = len(range(0, len(ROWS), world)) if sharding == "tw" else len(ROWS)
    return 2 * (world - 1) * BATCH * tables * DIM * element_size


def measure(impl: str, sharding: str, world: int, args: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(
            _worker, args=(impl, sharding, world, free_port(), args, out), nprocs=world, join=True
        )
        result: dict[str, Any] = json.loads(Path(out).read_text())
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["shardrec", "torchrec", "both"], default="both")
    parser.add_argument(
        "--no-unchecked",
        action="store_true",
        help="skip the shardrec run with check_inputs=False (the batch checks' cost)",
    )
    parser.add_argument("--sharding", choices=["tw", "rw"], nargs="+", default=["tw", "rw"])
    parser.add_argument(
        "--comm-precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="also time shardrec with the pooled outputs and their gradients sent in this dtype,"
        " beside the fp32 step, and print the output bytes each saves",
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]:
        print("warning: run under MALLOC_MMAP_THRESHOLD_=33554432 (see docs/benchmarks.md)")
    if args.impl == "torchrec":
        print(json.dumps({s: measure("torchrec", s, args.nproc, args) for s in args.sharding}))
        return
    # Alternating rounds, best of each: the machine is shared, and alternating puts both sides
    # through the same bursts of load.
    ours: dict[str, dict[str, Any]] = {}
    unchecked: dict[str, dict[str, Any]] = {}
    compressed: dict[str, dict[str, Any]] = {}
    peer: dict[str, dict[str, Any]] = {}
    with_peer = args.impl == "both" and peer_available()
    for _ in range(args.rounds):
        for s in args.sharding:
            got = measure("shardrec", s, args.nproc, args)
            keep_best(ours, s, got, _METRICS, ("flag_all_reduce_us", "check_us", "step_ms"))
            if not args.no_unchecked:
                got = measure("shardrec-unchecked", s, args.nproc, args)
                keep_best(unchecked, s, got, _METRICS)
            if args.comm_precision != "fp32":
                got = measure("shardrec-comm", s, args.nproc, args)
                keep_best(compressed, s, got, _METRICS, ("step_ms",))
            if with_peer:
                command = [
                    str(Path(__file__).resolve()), "--impl", "torchrec", "--nproc",
                    str(args.nproc), "--steps", str(args.steps), "--warmup", str(args.warmup),
                    "--repeats", str(args.repeats), "--sharding", s,
                ]  # fmt: skip
                keep_best(peer, s, json.loads(run_peer(command).splitlines()[-1])[s], _METRICS)
    print(f"DMP training step: 26 tables, dim 64, batch {BATCH}/rank, {args.nproc} gloo processes")
    print("samples/s over all ranks: wall clock (best window) | per CPU-second of the busiest rank")
    header = f"{'sharding':>9} {'shardrec':>17} {'TorchRec':>17} {'ratio':>13}"
    print(header)
    for s in args.sharding:
        mine, theirs = ours[s], peer.get(s, {})
        if "error" in mine:
            print(f"{s:>9} shardrec failed: {mine['error']}\n{mine['trace']}")
            continue
        line = f"{s:>9} {mine['samples_per_s']:>7.0f} | {mine['samples_per_cpu_s']:>7.0f}"
        if "samples_per_s" in theirs:
            wall = mine["samples_per_s"] / theirs["samples_per_s"]
            cpu = mine["samples_per_cpu_s"] / theirs["samples_per_cpu_s"]
            line += f" {theirs['samples_per_s']:>7.0f} | {theirs['samples_per_cpu_s']:>7.0f}"
            line += f" {wall:>5.2f}x | {cpu:.2f}x"
        else:
            line += "      n/a"
            if theirs.get("error"):
                line += f"  (TorchRec failed: {theirs['error'][:200]})"
        print(line)
    for s in args.sharding:
        mine, off = ours[s], unchecked.get(s, {})
        if "samples_per_s" in mine and "samples_per_s" in off:
            wall = off["samples_per_s"] / mine["samples_per_s"] - 1
            cpu = off["samples_per_cpu_s"] / mine["samples_per_cpu_s"] - 1
            print(
                f"{s}: batch checks cost {wall:+.1%} of a step by wall clock, {cpu:+.1%} by CPU"
                f" time (check_inputs=False: {off['samples_per_s']:.0f} |"
                f" {off['samples_per_cpu_s']:.0f} samples/s)"
            )
    for s in args.sharding:
        if "check_us" in ours[s]:
            us, ms = ours[s]["check_us"], ours[s]["step_ms"]
            print(
                f"{s}: the local batch check alone takes {us:.0f} us per forward (median),"
                f" {us / 1e3 / ms:.2%} of the fastest step ({ms:.1f} ms)"
            )
    for s in args.sharding:
        mine, q = ours[s], compressed.get(s, {})
        if "step_ms" in mine and "step_ms" in q:
            fp32_mib = output_bytes(s, args.nproc, 4) / 2**20
            q_mib = output_bytes(s, args.nproc, 2) / 2**20
            print(
                f"{s}: {args.comm_precision} output comm: step {q['step_ms']:.1f} ms"
                f" ({q['samples_per_s']:.0f} | {q['samples_per_cpu_s']:.0f} samples/s) vs fp32"
                f" {mine['step_ms']:.1f} ms ({mine['samples_per_s']:.0f} |"
                f" {mine['samples_per_cpu_s']:.0f}); pooled-output bytes each rank sends per step,"
                f" forward + backward: {q_mib:.1f} MiB vs {fp32_mib:.1f} MiB"
            )
    flags = [ours[s].get("flag_all_reduce_us") for s in args.sharding]
    timed = [f for f in flags if f is not None]
    if timed:
        print(
            f"data-parallel tables' check: one all-reduce of {args.nproc} int32 per forward,"
            f" median {min(timed):.0f} us (gloo, {args.nproc} processes)"
        )


if __name__ == "__main__":
    main()
