"""How much injected network latency shows up in a DistributedModelParallel training step.

    .venv/bin/python tools/bench/latency.py [--nproc 2] [--latency-ms 0 1 5 20]

Every collective of the step (the sharders' all-to-alls and reduce-scatters, DDP's all-reduce of
the dense gradients) runs on a ``shardrec.distributed.latency`` delayed group: gloo, with each
collective completing a fixed latency after gloo's. For each latency the step is timed and
compared with the step at 0 ms:

    exposed = (step(latency) - step(0)) / (latency x collectives per step)

100 % means every collective waited out its full latency (a blocking step, whose collectives wait
one after another); a step that computes while its collectives are in flight shows less. Steps are
named in ``STEPS``: ``blocking`` (forward, backward, step), ``pipelined`` (shardrec's
``TrainPipelineSparseDist``: the next batch's input distribution in flight during this batch, and
this batch's output distribution started before its forward) and ``pipelined, output late`` (the
same pipeline with each output distribution started only where the model calls the module, as
before that change: the same-run reference for what starting it early hides).
With ``--impl both`` (default) TorchRec's blocking loop and its ``TrainPipelineSparseDist`` run too,
in ``.venv-peer`` on the same delayed group (tw and rw). ``hidden``: the latency the blocking loop
added and the pipelined one did not, over the latency the input distribution's two collectives were
given (each loop measured against its own 0 ms step).

Workload: an EmbeddingBagCollection of 8 tables (100,000 rows, dim 64, one id per feature),
batch 1024 per rank, every table table-wise (round-robin over the ranks), row-wise, or
table-row-wise (``--sharding tw|rw|twrw``; twrw: tables alternate between the nodes of ``--local``
ranks, rows split inside, its node groups delayed alike), a Linear 512-256-1 over-arch under DDP,
fused SGD, on ``--nproc`` gloo processes on CPU. ``--bottom`` adds DLRM's shape of dense work that
the embeddings are not needed for: an MLP 256-512-512-64 over dense features, run before the EBC
is called, its output concatenated to the pooled rows (shardrec only: the TorchRec model has none).
Printed: the step (ms; the slowest rank's median over ``--steps`` steps, best of ``--rounds``
rounds that alternate the order of the latencies), the latency it added, the collectives per step,
and the exposed share.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import free_port, peer_available, run_peer

TABLES: Final = 8
ROWS: Final = 100_000
DIM: Final = 64
BATCH: Final = 1024
LR: Final = 0.01
FEATURES: Final = [f"f{i}" for i in range(TABLES)]

Step = Callable[[], None]


DENSE_IN: Final = 256
BOTTOM: Final = [512, 512, 64]


def _model(sharding: str, world: int, group: dist.ProcessGroup, bottom: bool) -> torch.nn.Module:
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig
    from shardrec.distributed import (
        DistributedModelParallel,
        ParameterSharding,
        ShardingEnv,
        ShardingPlan,
        ShardMetadata,
    )
    from shardrec.distributed.node_groups import NodeLayout
    from shardrec.distributed.sharding_plan import row_wise, table_wise

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=f"t_{f}", num_embeddings=ROWS, embedding_dim=DIM, feature_names=[f]
                    )
                    for f in FEATURES
                ],
                device="meta",
                fused_params={"optimizer": "sgd", "learning_rate": LR},
            )
            torch.manual_seed(0)
            self.bottom: torch.nn.Module | None = None
            if bottom:
                sizes = [DENSE_IN, *BOTTOM]
                layers: list[torch.nn.Module] = []
                for a, b in itertools.pairwise(sizes):
                    layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
                self.bottom = torch.nn.Sequential(*layers)
            width = DIM * TABLES + (BOTTOM[-1] if bottom else 0)
            self.over = torch.nn.Sequential(
                torch.nn.Linear(width, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)
            )

        def forward(self, kjt: Any, labels: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
            # The bottom MLP first, as DLRM orders it: work the pooled rows are not needed for.
            parts = [] if self.bottom is None else [self.bottom(dense)]
            rows = self.ebc(kjt).values()
            logits = self.over(torch.cat([rows, *parts], dim=1)).squeeze(1)
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)

    layout = NodeLayout.from_env(world)

    def one(i: int) -> ParameterSharding:
        if sharding == "tw":
            return table_wise(i % world, ROWS, DIM)
        if sharding == "rw":
            return row_wise(ROWS, DIM, world)
        # Table-row-wise: tables alternate between the nodes, rows split evenly inside.
        ranks = layout.ranks_of_node(i % layout.nodes)
        block = ROWS // len(ranks)
        return ParameterSharding(
            sharding_type="table_row_wise",
            compute_kernel="fused",
            ranks=tuple(ranks),
            shards=tuple(
                ShardMetadata((k * block, 0), (block, DIM), r) for k, r in enumerate(ranks)
            ),
        )

    plan = {f"t_{f}": one(i) for i, f in enumerate(FEATURES)}
    return DistributedModelParallel(
        Model(), env=ShardingEnv.from_process_group(group), plan=ShardingPlan({"ebc": plan})
    )


def blocking_step(model: torch.nn.Module, rank: int) -> Step:
    """Today's step: forward, backward, optimizer; each collective waited for when issued."""
    dense = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    batches = _batches(rank)
    at = [0]

    def step() -> None:
        b = batches[at[0] % len(batches)]
        at[0] += 1
        loss = model(b.kjt, b.labels, b.dense)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()

    return step


@dataclass(frozen=True)
class _Batch:
    kjt: Any
    labels: torch.Tensor
    dense: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> _Batch:
        return self


def _batches(rank: int) -> list[_Batch]:
    from shardrec import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(rank)
    return [
        _Batch(
            KeyedJaggedTensor(
                keys=FEATURES,
                values=torch.randint(0, ROWS, (TABLES * BATCH,), generator=gen),
                lengths=torch.ones(TABLES * BATCH, dtype=torch.int32),
            ),
            torch.randint(0, 2, (BATCH,), generator=gen).float(),
            torch.randn(BATCH, DENSE_IN, generator=gen),
        )
        for _ in range(4)
    ]


def _cycle(batches: list[_Batch]) -> Iterator[_Batch]:
    at = 0
    while True:
        yield batches[at % len(batches)]
        at += 1


def pipelined_step(model: torch.nn.Module, rank: int, *, output_late: bool = False) -> Step:
    """shardrec's TrainPipelineSparseDist: batch i+1's input all-to-all in flight during batch i,
    batch i's output distributions started before its forward (``output_late``: where the model
    calls the module, as the pipeline did before it started them early)."""
    from shardrec.distributed.train_pipeline import TrainPipelineSparseDist

    dense = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)

    def forward(m: torch.nn.Module, b: _Batch) -> tuple[torch.Tensor, None]:
        return m(b.kjt, b.labels, b.dense), None

    pipeline = TrainPipelineSparseDist(model, dense, torch.device("cpu"), forward=forward)
    it = _cycle(_batches(rank))
    pipeline.progress(it)  # the first step learns which modules it pipelines
    if output_late:
        # A benchmark's switch, through a private attribute: the pipelined modules' early start
        # does nothing, so each looks up and sends its rows when the model calls it.
        for pf in pipeline._forwards.values():
            pf.start = lambda now: None  # type: ignore[method-assign]

    def step() -> None:
        pipeline.progress(it)

    return step


# Step name -> builder; each gets its columns in the table.
STEPS: Final[dict[str, Callable[[torch.nn.Module, int], Step]]] = {
    "blocking": blocking_step,
    "pipelined": pipelined_step,
    "pipelined, output late": partial(pipelined_step, output_late=True),
}


def _shardrec_step(
    name: str, sharding: str, world: int, group: Any, rank: int, bottom: bool
) -> Step:
    return STEPS[name](_model(sharding, world, group, bottom), rank)


# TorchRec's loops, run in .venv-peer (TorchRec 1.8.0) on the same delayed group.
PEER_STEPS: Final = ["torchrec blocking", "torchrec pipelined"]


def _torchrec_step(name: str, sharding: str, world: int, group: Any, rank: int) -> Step:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.sharding_plan import row_wise as tr_row_wise
    from torchrec.distributed.sharding_plan import table_wise as tr_table_wise
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.streamable import Pipelineable

    if sharding not in ("tw", "rw"):
        raise ValueError(f"TorchRec has no {sharding} in this benchmark (tw and rw only)")

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=f"t_{f}", num_embeddings=ROWS, embedding_dim=DIM, feature_names=[f]
                    )
                    for f in FEATURES
                ],
                device=torch.device("meta"),
            )
            torch.manual_seed(0)
            self.over = torch.nn.Sequential(
                torch.nn.Linear(DIM * TABLES, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)
            )

        def forward(self, batch: Any) -> tuple[torch.Tensor, None]:
            logits = self.over(self.ebc(batch.kjt).values()).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
            return loss, None

    class Batch(Pipelineable):  # type: ignore[misc]
        def __init__(self, kjt: Any, labels: torch.Tensor) -> None:
            self.kjt, self.labels = kjt, labels

        def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
            return self

        def record_stream(self, stream: Any) -> None:
            pass

    model = Model()
    apply_optimizer_in_backward(torch.optim.SGD, model.ebc.parameters(), {"lr": LR})
    sharder = EmbeddingBagCollectionSharder()
    per_param = {
        f"t_{f}": tr_table_wise(rank=i % world) if sharding == "tw" else tr_row_wise()
        for i, f in enumerate(FEATURES)
    }
    module_plan = construct_module_sharding_plan(
        model.ebc, per_param, sharder=sharder, local_size=world, world_size=world,
        device_type="cpu",
    )  # fmt: skip
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(group), device=torch.device("cpu"),
        plan=ShardingPlan({"ebc": module_plan}), sharders=[sharder],
    )  # fmt: skip
    dense = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR)
    from torchrec import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(rank)
    batches = [
        Batch(
            KeyedJaggedTensor(
                keys=FEATURES,
                values=torch.randint(0, ROWS, (TABLES * BATCH,), generator=gen),
                lengths=torch.ones(TABLES * BATCH, dtype=torch.int32),
            ),
            torch.randint(0, 2, (BATCH,), generator=gen).float(),
        )
        for _ in range(4)
    ]

    def cycle() -> Iterator[Any]:
        at = 0
        while True:
            yield batches[at % len(batches)]
            at += 1

    it = cycle()
    if name == "torchrec pipelined":
        pipeline = TrainPipelineSparseDist(dmp, dense, torch.device("cpu"))

        def piped() -> None:
            pipeline.progress(it)

        return piped

    def blocking() -> None:
        loss, _ = dmp(next(it))
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()

    return blocking


def _delayed_groups(group: Any, sharding: str) -> list[Any]:
    """The main delayed group and, for table-row-wise, the node groups made on its backend."""
    from shardrec.distributed import ShardingEnv
    from shardrec.distributed.latency import DelayedProcessGroup
    from shardrec.distributed.node_groups import node_groups

    groups = [group]
    if sharding == "twrw":
        made = node_groups(ShardingEnv.from_process_group(group))
        groups += [g for g in (made.intra, made.cross) if isinstance(g, DelayedProcessGroup)]
    return groups


def _worker(rank: int, world: int, port: int, args: Any, out: str) -> None:
    from shardrec.distributed.latency import new_delayed_group

    if args.local is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(args.local)

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    result: dict[str, Any] = {}
    try:
        group = new_delayed_group(0.0)
        assert group is not None
        builders: dict[str, Callable[[], Step]] = (
            {n: partial(_torchrec_step, n, args.sharding, world, group, rank) for n in PEER_STEPS}
            if args.impl == "torchrec"
            else {
                n: partial(_shardrec_step, n, args.sharding, world, group, rank, args.bottom)
                for n in (args.loops or STEPS)
            }
        )
        for name, build in builders.items():
            step = build()
            delayed = _delayed_groups(group, args.sharding)
            for _ in range(args.warmup):
                step()
            best = {ms: float("inf") for ms in args.latency_ms}
            per_step = dict.fromkeys(args.latency_ms, 0.0)
            # Rounds alternate the order of the latencies: the machine's bursts of load hit each
            # latency alike, and the best round of each is kept.
            for round_index in range(args.rounds):
                order = args.latency_ms if round_index % 2 == 0 else args.latency_ms[::-1]
                for latency_ms in order:
                    for g in delayed:
                        g.latency_s = latency_ms / 1000
                    step()
                    times, issued = [], sum(g.issued for g in delayed)
                    for _ in range(args.steps):
                        dist.barrier()  # on the default (undelayed) group
                        start = time.perf_counter()
                        step()
                        times.append(time.perf_counter() - start)
                    per_step[latency_ms] = (sum(g.issued for g in delayed) - issued) / args.steps
                    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
                    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                    best[latency_ms] = min(best[latency_ms], float(slowest))
            result[name] = [
                {"latency_ms": ms, "step_s": best[ms], "collectives": per_step[ms]}
                for ms in args.latency_ms
            ]
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run(args: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(args.nproc, free_port(), args, out), nprocs=args.nproc, join=True)
        result: dict[str, Any] = json.loads(Path(out).read_text())
        return result


# The collectives of an input distribution: the split exchange, then the ids (tw, rw, twrw).
INPUT_DIST_COLLECTIVES: Final = 2
# Each pipelined loop and the blocking loop of the same library it is compared with.
PAIRS: Final = {
    "pipelined": "blocking",
    "pipelined, output late": "blocking",
    "torchrec pipelined": "torchrec blocking",
}


def table(result: dict[str, Any]) -> str:
    names = [n for n in result if isinstance(result[n], list)]
    head = ["latency ms"]
    for name in names:
        head += [f"{name}: collectives", "step ms", "added ms", "exposed"]
        if PAIRS.get(name) in names:
            head += ["hidden (of input dist latency)"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    base = {name: result[name][0]["step_s"] for name in names}
    for i, row in enumerate(result[names[0]]):
        latency = row["latency_ms"]
        cells = [f"{latency:g}"]
        added: dict[str, float] = {}
        for name in names:
            got = result[name][i]
            added[name] = (got["step_s"] - base[name]) * 1000
            injected = latency * got["collectives"]
            exposed = f"{100 * added[name] / injected:.0f} %" if injected else "-"
            cells += [
                f"{got['collectives']:.0f}",
                f"{got['step_s'] * 1000:.1f}",
                f"{added[name]:.1f}" if injected else "-",
                exposed,
            ]
            blocking = PAIRS.get(name)
            if blocking in names:
                # Latency the blocking loop showed and this one did not, as a share of what the
                # input distribution's collectives were given.
                given = INPUT_DIST_COLLECTIVES * latency
                hidden = (added[blocking] - added[name]) / given if given else None
                cells += ["-" if hidden is None else f"{100 * hidden:.0f} %"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--sharding", choices=["tw", "rw", "twrw"], default="tw")
    parser.add_argument(
        "--local",
        type=int,
        default=None,
        help="ranks per node (LOCAL_WORLD_SIZE) for twrw; default: one node",
    )
    parser.add_argument(
        "--latency-ms", type=float, nargs="+", default=[0.0, 1.0, 5.0, 20.0],
        help="latencies to inject; the first is the baseline (0 unless you mean otherwise)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=8, help="timed steps per latency and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--impl", choices=["shardrec", "torchrec", "both"], default="both",
        help="both: shardrec here, then TorchRec's loops in .venv-peer when it exists (tw, rw)",
    )  # fmt: skip
    parser.add_argument(
        "--bottom", action="store_true",
        help="a bottom MLP over dense features before the EBC (shardrec's loops only)",
    )  # fmt: skip
    parser.add_argument(
        "--loops", nargs="+", choices=list(STEPS), default=None,
        help="shardrec's loops to time (default: all of them)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.bottom and args.impl == "torchrec":
        parser.error("--bottom: TorchRec's model here has no bottom MLP")
    result = run(args)
    if "error" in result:
        raise SystemExit(f"latency benchmark failed: {result['error']}\n{result['trace']}")
    if args.impl == "torchrec":
        print(json.dumps(result))
        return
    if args.impl == "both" and args.bottom:
        print("TorchRec's loops did not run: its model here has no bottom MLP (--bottom)")
    elif args.impl == "both" and args.sharding in ("tw", "rw") and peer_available():
        command = [str(Path(__file__).resolve()), *sys.argv[1:], "--impl", "torchrec"]
        try:
            peer = json.loads(run_peer(command).splitlines()[-1])
        except (RuntimeError, ValueError) as error:
            peer = {"error": str(error)}
        if "error" in peer:
            print(f"TorchRec's loops did not run: {peer['error']}")
        else:
            result.update(peer)
    print(
        f"DMP step under injected latency: {args.nproc} gloo processes, {TABLES} tables x {ROWS}"
        f" rows x {DIM}, batch {BATCH} per rank, {args.sharding}"
        + (f", {args.local} ranks per node" if args.local else "")
        + (f", bottom MLP {'-'.join(map(str, [DENSE_IN, *BOTTOM]))}" if args.bottom else "")
    )
    print(table(result))


if __name__ == "__main__":
    main()
