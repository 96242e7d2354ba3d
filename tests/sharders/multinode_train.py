"""A small DMP training run for ``torchrun``: table-row-wise tables on every node, three steps.

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank N --master-addr HOST --master-port PORT \\
        tests/sharders/multinode_train.py OUT_DIR

Each rank trains on its slice of a global batch (``make_batch``) and writes ``OUT_DIR/rank<R>.pt``:
its outputs per step, its table shards after training, and what torchrun told it (node, local
rank, ranks per node). ``test_multinode.py`` runs it as two nodes on this machine and compares it
with the unsharded module, which it builds with this file's ``build`` and ``make_batch``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardingPlan,
    ShardMetadata,
)
from shardrec.distributed.sharding_plan import even_splits

TABLES = [("t0", 11, 4, ["f0"]), ("t1", 6, 8, ["f1", "f2"]), ("t2", 9, 4, ["f3"])]
NODE_OF = {"t0": 0, "t1": 1, "t2": 0}
KEYS = ["f0", "f1", "f2", "f3"]
BATCH = 3  # per rank
STEPS = 3
LR = 0.05


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = EmbeddingBagCollection(
            [
                EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f)
                for n, r, d, f in TABLES
            ],
            fused_params={"optimizer": "sgd", "learning_rate": LR},
        )
        self.dense = nn.Linear(sum(d * len(f) for _, _, d, f in TABLES), 1)

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.emb(kjt).values()
        return rows, self.dense(torch.tanh(rows)).sum()


def make_batch(step: int, world: int, rank: int | None) -> KeyedJaggedTensor:
    """Rank ``rank``'s ``BATCH`` samples of the global batch of step ``step`` (all for None)."""
    g = torch.Generator().manual_seed(100 + step)
    rows = {f: r for _, r, _, fs in TABLES for f in fs}
    lengths = torch.randint(0, 4, (len(KEYS), BATCH * world), generator=g)
    ids = [
        torch.randint(0, rows[f], (int(lengths[k].sum()),), generator=g) for k, f in enumerate(KEYS)
    ]
    lo, hi = (0, BATCH * world) if rank is None else (rank * BATCH, (rank + 1) * BATCH)
    values = []
    for k in range(len(KEYS)):
        first = int(lengths[k, :lo].sum())
        values.append(ids[k][first : first + int(lengths[k, lo:hi].sum())])
    return KeyedJaggedTensor(
        keys=KEYS, values=torch.cat(values), lengths=lengths[:, lo:hi].reshape(-1)
    )


def plan(local_world_size: int) -> ShardingPlan:
    """Each table on its node (``NODE_OF``), rows split evenly over the node's ranks."""
    tables = {}
    for name, rows, dim, _ in TABLES:
        first = NODE_OF[name] * local_world_size
        shards = tuple(
            ShardMetadata((at, 0), (n, dim), first + i)
            for i, (at, n) in enumerate(even_splits(rows, local_world_size))
            if n
        )
        tables[name] = ParameterSharding(
            sharding_type="table_row_wise",
            compute_kernel="fused",
            ranks=tuple(s.rank for s in shards),
            shards=shards,
        )
    return ShardingPlan({"emb": tables})


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
    model = Model()
    dmp = DistributedModelParallel(model, plan=plan(local_world_size))
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR * world)
    outputs = []
    for step in range(STEPS):
        rows, loss = dmp(make_batch(step, world, rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        outputs.append(rows.detach().clone())
    shards = {
        table: [(s.tensor.clone(), list(s.offsets)) for s in ts.weight]
        for table, ts in dmp.local_table_shards()["emb"].items()
    }
    launcher = {k: int(os.environ[k]) for k in ("GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    result = {"outputs": outputs, "shards": shards, "launcher": launcher}
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
