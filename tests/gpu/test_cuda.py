"""The embedding modules and every sharding on a CUDA device, against the same model on the CPU.

These run only where a GPU is present (the project's lent GPU machine: torch 2.11, no FBGEMM, so the
pure-torch kernel); on the CPU-only CI machine they are skipped, and nothing here counts there.
Sharding runs at world size 1 on NCCL: several ranks cannot share one GPU under NCCL, and the
multi-rank coverage of the same collectives is on gloo in tests/sharders/.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)
from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
)
from shardrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
TABLES = [("t0", 11, 8, ["f0"]), ("t1", 17, 16, ["f1", "f2"]), ("t2", 5, 4, ["f3"])]
KEYS = ["f0", "f1", "f2", "f3"]
STEPS = 3
LR = 0.1


def batch(step: int, device: torch.device, weighted: bool = False) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(step)
    rows = {f: r for _, r, _, fs in TABLES for f in fs}
    lengths = torch.randint(0, 4, (len(KEYS), 6), generator=g)
    values = torch.cat(
        [
            torch.randint(0, rows[f], (int(lengths[k].sum()),), generator=g)
            for k, f in enumerate(KEYS)
        ]
    )
    w = torch.rand(values.numel(), generator=g) + 0.5 if weighted else None
    kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths.reshape(-1), weights=w)
    return kjt.to(device)


def ebc(device: torch.device, pooling: str, weighted: bool, optimizer: str | None) -> nn.Module:
    torch.manual_seed(0)
    fused = None if optimizer is None else {"optimizer": optimizer, "learning_rate": LR}
    bags = [
        EmbeddingBagConfig(
            name=n, num_embeddings=r, embedding_dim=d, feature_names=f, pooling=PoolingType(pooling)
        )
        for n, r, d, f in TABLES
    ]
    module = EmbeddingBagCollection(
        tables=bags,
        is_weighted=weighted,
        fused_params=fused,
        backend="torch",
    )
    return module.to(device)


def ec(device: torch.device, optimizer: str | None) -> nn.Module:
    torch.manual_seed(0)
    fused = None if optimizer is None else {"optimizer": optimizer, "learning_rate": LR}
    seqs = [
        EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f)
        for n, r, d, f in TABLES
    ]
    module = EmbeddingCollection(
        tables=seqs,
        fused_params=fused,
        backend="torch",
    )
    return module.to(device)


def flat(out: object) -> torch.Tensor:
    if isinstance(out, dict):
        return torch.cat([out[k].values().reshape(-1) for k in sorted(out)])
    return out.values()  # type: ignore[attr-defined,no-any-return]


def run(module: nn.Module, device: torch.device, weighted: bool = False) -> list[torch.Tensor]:
    outs = []
    for step in range(STEPS):
        out = flat(module(batch(step, device, weighted)))
        torch.autograd.backward(
            (out * torch.arange(out.numel(), device=device).reshape(out.shape)).sum()
        )
        outs.append(out.detach().cpu())
    return outs


@pytest.mark.parametrize("pooling", ["SUM", "MEAN"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "exact_adagrad", "rowwise_adagrad", "adam"])
def test_ebc_on_cuda_matches_cpu(pooling: str, weighted: bool, optimizer: str) -> None:
    cpu, gpu = (
        ebc(torch.device("cpu"), pooling, weighted, optimizer),
        ebc(CUDA, pooling, weighted, optimizer),
    )
    for a, b in zip(run(cpu, torch.device("cpu"), weighted), run(gpu, CUDA, weighted), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items(), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_ec_on_cuda_matches_cpu(optimizer: str) -> None:
    cpu, gpu = ec(torch.device("cpu"), optimizer), ec(CUDA, optimizer)
    for a, b in zip(run(cpu, torch.device("cpu")), run(gpu, CUDA), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items(), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def nccl() -> Iterator[ShardingEnv]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    yield ShardingEnv.from_process_group()
    dist.destroy_process_group()


def plan_for(kind: str) -> ShardingPlan:
    make: dict[str, Callable[[int, int], ParameterSharding]] = {
        "table_wise": lambda r, d: table_wise(0, r, d),
        "row_wise": lambda r, d: row_wise(r, d, 1),
        "column_wise": lambda r, d: column_wise(r, d, [0, 0] if d % 2 == 0 else [0]),
        "data_parallel": lambda r, d: data_parallel(r, d, 1),
    }
    return ShardingPlan({"": {n: make[kind](r, d) for n, r, d, _ in TABLES}})


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise", "data_parallel"])
@pytest.mark.parametrize("module", ["ebc", "ec"])
def test_sharded_on_nccl_matches_unsharded_cpu(
    nccl: ShardingEnv, sharding: str, module: str
) -> None:
    # Row-wise Adagrad keeps one state per row of a shard, so column-wise shards differ from the
    # unsharded table by design; SGD is exact for every sharding.
    optimizer = {"data_parallel": None, "column_wise": "sgd"}.get(sharding, "rowwise_adagrad")

    def build(device: torch.device) -> nn.Module:
        return ebc(device, "SUM", False, optimizer) if module == "ebc" else ec(device, optimizer)

    reference = build(torch.device("cpu"))
    expected = run(reference, torch.device("cpu"))
    sharded = DistributedModelParallel(
        build(torch.device("cpu")), env=nccl, device=CUDA, plan=plan_for(sharding)
    )
    if sharding == "data_parallel":
        # Plain .grad on replicated tables: the same SGD step on both sides.
        reference = build(torch.device("cpu"))
        ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
        opt = torch.optim.SGD(sharded.parameters(), lr=LR)
        expected = []
        got: list[torch.Tensor] = []
        for step in range(STEPS):
            for model, o, dev, sink in (
                (reference, ref_opt, torch.device("cpu"), expected),
                (sharded, opt, CUDA, got),
            ):
                out = flat(model(batch(step, dev)))
                torch.autograd.backward(
                    (out * torch.arange(out.numel(), device=dev).reshape(out.shape)).sum()
                )
                o.step()
                o.zero_grad()
                sink.append(out.detach().cpu())
    else:
        got = run(sharded, CUDA)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_a_dlrm_batch_pins_and_records_its_stream(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    from shardrec_dlrm.data import open_dataset
    from shardrec_dlrm.data.synth import synth

    synth(Path(tmp_path), rows=200, seed=0)
    host = next(
        open_dataset(Path(tmp_path), num_embeddings_per_feature=[10] * 26).split("train").batches(8)
    )
    pinned = host.pin_memory()
    assert pinned.dense_features.is_pinned()
    assert pinned.sparse_features.values().is_pinned()
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    with torch.cuda.stream(side):
        moved = pinned.to(CUDA, non_blocking=True)
    torch.cuda.current_stream().wait_stream(side)
    moved.record_stream(torch.cuda.current_stream())
    assert torch.equal(moved.labels.cpu(), host.labels)
    assert torch.equal(moved.sparse_features.values().cpu(), host.sparse_features.values())
