"""The pipelined loop and compressed output communication on a CUDA device, at world size 1 on NCCL.

They run only where a GPU is present (``tools/gpu_check.sh`` on a lent machine); the multi-rank
proofs of both are on gloo in tests/sharders/. ``pipeline_case``, ``side_stream_case`` and
``bf16_case`` take the device and process group, so the same code is exercised on the CPU by this
file's last test.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from shardrec.distributed.qcomm import QCommsConfig, with_qcomms
from shardrec.distributed.sharding_plan import row_wise, table_wise
from shardrec.distributed.train_pipeline import (
    TrainPipeline,
    TrainPipelineBase,
    TrainPipelineSparseDist,
)

TABLES = [("t0", 11, 8, ["f0"]), ("t1", 17, 16, ["f1", "f2"])]
KEYS = ["f0", "f1", "f2"]
STEPS = 4


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f)
                for n, r, d, f in TABLES
            ],
            fused_params={"optimizer": "rowwise_adagrad", "learning_rate": 0.1},
            backend="torch",
        )
        self.head = nn.Linear(8 + 16 + 16, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.ebc(kjt).values())
        return out.square().mean(), out


def batches() -> list[KeyedJaggedTensor]:
    found = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        lengths = torch.randint(0, 4, (len(KEYS), 6), generator=g)
        rows = [11, 17, 17]
        values = torch.cat(
            [torch.randint(0, rows[k], (int(lengths[k].sum()),), generator=g) for k in range(3)]
        )
        found.append(KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths.reshape(-1)))
    return found


def plan(kind: str) -> ShardingPlan:
    make = {
        "table_wise": lambda r, d: table_wise(0, r, d),
        "row_wise": lambda r, d: row_wise(r, d, 1),
    }
    return ShardingPlan({"ebc": {n: make[kind](r, d) for n, r, d, _ in TABLES}})


@dataclass(frozen=True, slots=True)
class SlowCopy:
    """A batch (in pinned memory, as a DataLoader with ``pin_memory=True`` gives it) whose copy
    to a CUDA device first keeps the copying stream busy for a while: a stream that read the
    batch without waiting for the copy would read it half copied."""

    kjt: KeyedJaggedTensor

    def to(self, device: torch.device, non_blocking: bool = False) -> SlowCopy:
        if device.type == "cuda":
            COPY_STREAMS.append(torch.cuda.current_stream(device))
            # A spin kernel of some tens of milliseconds, on the stream the copy is issued to.
            torch.cuda._sleep(50_000_000)  # type: ignore[no-untyped-call]
        return SlowCopy(self.kjt.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        self.kjt.record_stream(stream)


COPY_STREAMS: list[torch.cuda.Stream] = []  # the streams SlowCopy.to ran on


def slow_batches() -> list[SlowCopy]:
    pin = torch.cuda.is_available()
    return [SlowCopy(k.pin_memory() if pin else k) for k in batches()]


def slow_forward(model: nn.Module, batch: SlowCopy) -> tuple[torch.Tensor, torch.Tensor]:
    loss, out = model(batch.kjt)
    return loss, out


def run_loop(loop: TrainPipeline[object], make: Callable[[], Sequence[object]] = batches) -> int:
    """Steps until the batches run out."""
    it, steps = iter(make()), 0
    while True:
        try:
            loop.progress(it)
        except StopIteration:
            return steps
        steps += 1


def trained(
    env: ShardingEnv, device: torch.device, kind: str, pipelined: bool, slow: bool = False
) -> dict[str, torch.Tensor]:
    """Tables, their fused optimizer state and the head after the batches, on the host."""
    model = Model()
    dmp = DistributedModelParallel(model, env=env, device=device, plan=plan(kind))
    optimizer = torch.optim.SGD(dmp.module.get_submodule("head").parameters(), lr=0.1)
    cls = TrainPipelineSparseDist if pipelined else TrainPipelineBase
    if slow:
        loop: TrainPipeline[object] = cls(dmp, optimizer, device, forward=slow_forward)
        assert run_loop(loop, slow_batches) == STEPS
    else:
        assert run_loop(cls(dmp, optimizer, device)) == STEPS
    out: dict[str, torch.Tensor] = {}
    for table, ts in dmp.local_table_shards()["ebc"].items():
        for i, s in enumerate(ts.weight):
            out[f"{table}.weight.{i}"] = s.tensor.detach().cpu().clone()
        for name, shards in ts.optimizer_state.items():
            for i, s in enumerate(shards):
                out[f"{table}.{name}.{i}"] = s.tensor.detach().cpu().clone()
    for name, p in dmp.module.get_submodule("head").named_parameters():
        out[f"head.{name}"] = p.detach().cpu().clone()
    return out


def pipeline_case(env: ShardingEnv, device: torch.device, kind: str) -> None:
    plain, piped = trained(env, device, kind, False), trained(env, device, kind, True)
    assert plain.keys() == piped.keys()
    for key in plain:
        torch.testing.assert_close(piped[key], plain[key], rtol=0, atol=0, msg=key)


def side_stream_case(env: ShardingEnv, device: torch.device) -> None:
    """On CUDA the pipeline copies each batch on its own side stream, and the current stream
    waits for that copy: the slow copies must not change what is trained."""
    COPY_STREAMS.clear()
    plain = trained(env, device, "row_wise", False, slow=True)
    plain_streams = list(COPY_STREAMS)
    COPY_STREAMS.clear()
    piped = trained(env, device, "row_wise", True, slow=True)
    for key in plain:
        torch.testing.assert_close(piped[key], plain[key], rtol=0, atol=0, msg=key)
    if device.type == "cuda":
        current = torch.cuda.current_stream(device)
        assert len(plain_streams) == len(COPY_STREAMS) == STEPS
        assert all(s == current for s in plain_streams)  # the plain loop: the current stream
        assert all(s != current for s in COPY_STREAMS)  # the pipeline: its side stream


def bf16_case(env: ShardingEnv, device: torch.device) -> None:
    exact = DistributedModelParallel(Model(), env=env, device=device, plan=plan("row_wise"))
    squeezed = DistributedModelParallel(
        Model(),
        env=env,
        device=device,
        plan=with_qcomms(plan("row_wise"), QCommsConfig.both("bf16")),
    )
    kjt = batches()[0].to(device)
    a = exact.module.get_submodule("ebc")(kjt).values()
    b = squeezed.module.get_submodule("ebc")(kjt).values()
    # At world size 1 nothing travels, so nothing is rounded: the compressed path must run on the
    # device and give the fp32 answer exactly (the rounding itself is proved on gloo, 2-4 ranks).
    assert torch.equal(a, b)
    b.square().sum().backward()


def _group(backend: str) -> Iterator[ShardingEnv]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield ShardingEnv.from_process_group()
    finally:
        dist.destroy_process_group()


@pytest.fixture
def nccl() -> Iterator[ShardingEnv]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.cuda.set_device(0)
    yield from _group("nccl")


@pytest.fixture
def gloo() -> Iterator[ShardingEnv]:
    yield from _group("gloo")


@pytest.mark.parametrize("kind", ["table_wise", "row_wise"])
def test_pipelined_training_on_nccl_equals_the_plain_loop(nccl: ShardingEnv, kind: str) -> None:
    pipeline_case(nccl, torch.device("cuda"), kind)


def test_the_pipeline_copies_on_a_side_stream_and_waits_for_it(nccl: ShardingEnv) -> None:
    side_stream_case(nccl, torch.device("cuda"))


def test_bf16_output_communication_runs_on_nccl(nccl: ShardingEnv) -> None:
    bf16_case(nccl, torch.device("cuda"))


def test_the_same_cases_hold_on_the_cpu(gloo: ShardingEnv) -> None:
    pipeline_case(gloo, torch.device("cpu"), "row_wise")
    side_stream_case(gloo, torch.device("cpu"))
    bf16_case(gloo, torch.device("cpu"))
