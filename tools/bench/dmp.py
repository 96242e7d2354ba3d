"""DistributedModelParallel training-step benchmark: shardrec against TorchRec 1.8.0, same run.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/dmp.py

Workload (issue 4): an EmbeddingBagCollection of 26 tables with Criteo Kaggle's cardinalities
capped at 1,000,000 rows, dimension 64, one id per feature drawn uniformly, batch 4096 per rank,
under DistributedModelParallel with every table table-wise (spread round-robin over the ranks) or
every table row-wise, on 2 gloo processes on CPU. A training step is: forward of the sharded
EBC, a small dense over-arch (Linear 1664-256-1, DDP), BCE loss, backward with fused SGD for the
tables, torch SGD for the dense layers. Both sides build the same model and the same plan the way
their users do; TorchRec gets its optimizer through ``apply_optimizer_in_backward``.

TorchRec does not offer row-wise sharding on CPU; the script asks for
it anyway through a sharder that lists it, and prints ``n/a`` if TorchRec fails.

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


def _shardrec_step(sharding: str, world: int) -> Any:
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from shardrec.distributed import DistributedModelParallel, ShardingPlan
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
    )
    plan = {
        f"t_{f}": table_wise(i % world, r, DIM) if sharding == "tw" else row_wise(r, DIM, world)
        for i, (f, r) in enumerate(zip(FEATURES, ROWS, strict=True))
    }
    model = DistributedModelParallel(_Model(ebc), plan=ShardingPlan({"ebc": plan}))
    dense = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    lengths = torch.ones(len(FEATURES) * BATCH, dtype=torch.int32)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> None:
        loss = model(KeyedJaggedTensor(keys=FEATURES, values=ids, lengths=lengths), labels)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()

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
        step = (_torchrec_step if impl == "torchrec" else _shardrec_step)(sharding, world)
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
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


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
    parser.add_argument("--sharding", choices=["tw", "rw"], nargs="+", default=["tw", "rw"])
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
    peer: dict[str, dict[str, Any]] = {}
    with_peer = args.impl == "both" and peer_available()
    for _ in range(args.rounds):
        for s in args.sharding:
            keep_best(ours, s, measure("shardrec", s, args.nproc, args), _METRICS)
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


if __name__ == "__main__":
    main()
