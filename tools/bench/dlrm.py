"""DLRM training step: shardrec's trainer against TorchRec 1.8.0, measured in the same run.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python tools/bench/dlrm.py

Workload: DLRM with 26 tables of Criteo Kaggle's cardinalities capped at 1,000,000 rows,
dimension 64, dense arch 512-256-64, over arch 512-512-256-1, batch 2048 per rank, one id per
feature drawn uniformly, fused SGD for the tables and torch SGD for the dense layers, on CPU with 1
and 2 gloo processes (``--device cuda``: shardrec alone, NCCL, one process per GPU). Each side
builds its own model the way its users do: shardrec through ``shardrec_dlrm`` (the model and
sharding code of ``dlrm train``), TorchRec through ``torchrec.models.dlrm`` with
``DistributedModelParallel`` and ``apply_optimizer_in_backward``.
Both use their planner's default plan for the world size.

shardrec runs once per kernel backend in ``--backends`` (``auto``, what ``dlrm train`` uses: FBGEMM
when installed; ``torch``: the pure-torch kernels). Printed: total samples/s over all ranks (median
of ``--repeats`` timed windows of ``--steps`` steps; best of ``--rounds`` rounds that alternate
the two sides), the peak resident memory of the largest rank (ru_maxrss), and TorchRec / shardrec
ratios (above 1: shardrec is faster / leaner). ``--impl
torchrec`` runs only TorchRec (it is what this script runs in
``.venv-peer``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import MALLOC_ENV, REPO, free_port, keep_best, peer_available, run_peer

KAGGLE_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
CAP = 1_000_000
TABLE_ROWS = tuple(min(rows, CAP) for rows in KAGGLE_ROWS)
DIM = 64
DENSE = (512, 256, 64)
OVER = (512, 512, 256, 1)
BATCH = 2048
LR = 0.01
# keep_best: the fastest round, and the lowest peak memory.
_BEST = (("samples_per_s",), ("peak_rss",))


def _synthetic_batches(
    rank: int, count: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` batches of (dense [B, 13], ids [26 * B] key-major, labels [B]); one id per
    feature."""
    gen = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(count):
        dense = torch.rand(BATCH, 13, generator=gen)
        ids = torch.cat([torch.randint(0, rows, (BATCH,), generator=gen) for rows in TABLE_ROWS])
        labels = torch.randint(0, 2, (BATCH,), generator=gen).float()
        out.append((dense, ids, labels))
    return out


def _shardrec_step(world_size: int, precision: str = "fp32", device: str = "cpu") -> Any:
    from shardrec import KeyedJaggedTensor
    from shardrec_dlrm.data import SPARSE_KEYS
    from shardrec_dlrm.model.config import ModelConfig
    from shardrec_dlrm.training.sharding import shard_for_benchmark

    model_config = ModelConfig(
        embedding_dim=DIM,
        num_embeddings_per_feature=TABLE_ROWS,
        dense_arch_layer_sizes=DENSE,
        over_arch_layer_sizes=OVER,
    )
    model, dense_optimizer = shard_for_benchmark(
        model_config,
        BATCH,
        LR,
        dense_precision=precision,  # type: ignore[arg-type]
        device=device,  # type: ignore[arg-type]
    )
    lengths = torch.ones(26 * BATCH, dtype=torch.int32, device=device)

    def step(dense: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> None:
        kjt = KeyedJaggedTensor(keys=list(SPARSE_KEYS), values=ids, lengths=lengths)
        loss, _ = model(dense, kjt, labels)
        dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dense_optimizer.step()

    return step


def _torchrec_step(world_size: int, precision: str = "fp32") -> Any:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.datasets.utils import Batch
    from torchrec.distributed import DistributedModelParallel
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    features = [f"cat_{i}" for i in range(26)]
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f])
        for f, rows in zip(features, TABLE_ROWS, strict=True)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    train = DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=13,
            dense_arch_layer_sizes=list(DENSE),
            over_arch_layer_sizes=list(OVER),
        )
    )
    apply_optimizer_in_backward(torch.optim.SGD, train.model.sparse_arch.parameters(), {"lr": LR})
    model = DistributedModelParallel(train, device=torch.device("cpu"))
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.SGD(params, lr=LR),
    )
    lengths = torch.ones(26 * BATCH, dtype=torch.int32)

    # bf16: the forward under torch.autocast, as a TorchRec user would write it.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(dense: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> None:
        kjt = KeyedJaggedTensor(keys=features, values=ids, lengths=lengths)
        with autocast:
            loss, _ = model(Batch(dense_features=dense, sparse_features=kjt, labels=labels))
        dense_optimizer.zero_grad()
        loss.backward()
        dense_optimizer.step()

    return step


def _worker(
    rank: int, impl: str, world_size: int, port: int, args: Any, out: str, backend: str
) -> None:
    if backend != "auto":
        os.environ["SHARDREC_KERNEL_BACKEND"] = backend
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )  # fmt: skip
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    if impl == "torchrec":
        step = _torchrec_step(world_size, args.precision)
    else:
        step = _shardrec_step(world_size, args.precision, args.device)
    batches = [tuple(t.to(args.device) for t in batch) for batch in _synthetic_batches(rank, 4)]
    for i in range(args.warmup):
        step(*batches[i % len(batches)])
    windows = []
    for _ in range(args.repeats):
        _sync(cuda)
        start = time.perf_counter()
        for i in range(args.steps):
            step(*batches[i % len(batches)])
        _sync(cuda)
        windows.append(time.perf_counter() - start)
    # Peak memory: resident host memory on CPU, allocated device memory on CUDA.
    if cuda:
        peak = torch.tensor([torch.cuda.max_memory_allocated()], device=args.device)
    else:
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        per_s = BATCH * world_size * args.steps / statistics.median(windows)
        Path(out).write_text(json.dumps({"samples_per_s": per_s, "peak_rss": int(peak)}))
    dist.destroy_process_group()


def _sync(cuda: bool) -> None:
    """Every rank at the same point, with its device's queued work done."""
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()


def measure(impl: str, world_size: int, args: Any, backend: str = "auto") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(
            _worker,
            args=(impl, world_size, free_port(), args, out, backend),
            nprocs=world_size,
            join=True,
        )
        result: dict[str, float] = json.loads(Path(out).read_text())
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["shardrec", "torchrec", "both"], default="both")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds of shardrec then TorchRec"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["auto", "torch"],
        help="shardrec kernel backends to measure (SHARDREC_KERNEL_BACKEND); auto is the default",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: the dense arches under bf16 autocast on both sides (shardrec: `dlrm train"
        " --dense-precision bf16`; TorchRec: its forward under torch.autocast)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: shardrec only, NCCL, one process per GPU (peak memory is then the GPU's"
        " allocated bytes); TorchRec is measured on the CPU only",
    )
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
        if max(args.nproc) > torch.cuda.device_count():
            sys.exit(f"--device cuda: {torch.cuda.device_count()} GPU(s), one process each")
        args.impl = "shardrec"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]:
        print("warning: run under MALLOC_MMAP_THRESHOLD_=33554432 (see docs/benchmarks.md)")
    if args.impl == "torchrec":
        results = {n: measure("torchrec", n, args) for n in args.nproc}
        print(json.dumps(results))
        return
    # Rounds alternate the two sides so that both see the machine's load of the moment; each
    # side keeps its best round (fastest, and its lowest peak memory).
    ours: dict[tuple[str, int], dict[str, Any]] = {}
    peer: dict[int, dict[str, Any]] = {}
    with_peer = args.impl == "both" and peer_available()
    for _ in range(args.rounds):
        for b in args.backends:
            for n in args.nproc:
                keep_best(ours, (b, n), measure("shardrec", n, args, b), *_BEST)
        if with_peer:
            command = [
                str(Path(__file__).resolve()), "--impl", "torchrec",
                "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--repeats", str(args.repeats), "--nproc", *map(str, args.nproc),
                "--precision", args.precision,
            ]  # fmt: skip
            got = json.loads(run_peer(command).splitlines()[-1])
            for n, result in got.items():
                keep_best(peer, int(n), result, *_BEST)
    where = f"CUDA NCCL ({torch.cuda.get_device_name()})" if args.device == "cuda" else "CPU gloo"
    print(
        f"DLRM training step, batch {BATCH}/rank, {where}, dense precision {args.precision},"
        f" {REPO.name}"
    )
    header = (
        f"{'backend':>8} {'procs':>5} {'shardrec samples/s':>19} {'peak MiB':>9} "
        f"{'TorchRec samples/s':>19} {'peak MiB':>9} {'speed ratio':>11} {'memory ratio':>12}"
    )
    print(header)
    for backend, n in ours:
        mine = ours[backend, n]
        row = (
            f"{backend:>8} {n:>5} {mine['samples_per_s']:>19,.0f} {mine['peak_rss'] / 2**20:>9,.0f}"
        )
        if n in peer:
            theirs = peer[n]
            row += (
                f" {theirs['samples_per_s']:>19,.0f} {theirs['peak_rss'] / 2**20:>9,.0f}"
                f" {mine['samples_per_s'] / theirs['samples_per_s']:>10.2f}x"
                f" {theirs['peak_rss'] / mine['peak_rss']:>11.2f}x"
            )
        print(row)
    if args.device == "cuda":
        print("(peak MiB: GPU memory allocated; TorchRec is not measured on CUDA)")
    elif not peer:
        print("(TorchRec not measured: run `make bench-peer` to build .venv-peer)")


if __name__ == "__main__":
    sys.exit(main())
