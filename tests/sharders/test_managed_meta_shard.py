"""A managed module whose id maps are built on the meta device, sharded: each rank builds only
the buckets it owns, empty, on its device, and the sharded model is the one built with CPU maps.

At 2 gloo processes, the meta-built model and the CPU-built model (same seed, same plan) start
with the same state on every rank (every buffer of every held bucket, the counters of the others,
the reset stream) and train bit for bit alike through steps with admissions and evictions:
outputs, dense gradients, table weights and optimizer sums, id maps, counters. Building and
sharding the meta model allocates exactly its own buckets' maps on each rank (a dispatch mode sees
every op); the CPU build allocates every bucket's. ``dlrm train --managed-ids --managed-buckets
--nproc 2`` runs with the maps built on meta.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.distributed import (
    DistributedModelParallel,
    ParameterSharding,
    ShardedEmbeddingModule,
    ShardingEnv,
    ShardingPlan,
)
from shardrec.distributed.sharding_plan import data_parallel, row_wise, table_wise
from shardrec.modules.managed_collision import MCHManagedCollisionModule
from shardrec.modules.mc_admission import CountThresholdAdmission
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from shardrec.modules.mc_policies import LFU_EvictionPolicy, LRU_EvictionPolicy
from shardrec.testing import GlobalBatch, record_allocations
from shardrec_sharders.managed_collision import ShardedManagedCollisionEmbeddings

pytestmark = pytest.mark.multiprocess

WORLD = 2
KEYS = ["f0", "f1", "f2"]
TOTAL = 7  # samples per global batch
STEPS = 6
POOL = torch.tensor([9_137_702_141, -42, 2**62, 7, -(2**40), 3, 11, *range(100, 125)])
# Buckets per table: not a multiple of the world size, so ranks hold different numbers of them.
BUCKETS = {"t0": 5, "t1": 3}


class Model(nn.Module):
    def __init__(self, mc: nn.Module) -> None:
        super().__init__()
        self.mc = mc
        self.dense = nn.Linear(22, 1)  # f0, f1 of 8 columns, f2 of 6

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.mc(kjt)
        rows = out.values()
        return rows, self.dense(torch.tanh(rows)).sum()


def build(maps: str, rows: tuple[int, int] = (13, 10), tables_on: str = "cpu") -> Model:
    """``maps``: ``cpu``; ``meta`` (the id maps built on meta); ``meta+rng`` (the reset
    stream's state moved to meta too, as a module moved whole to meta has it)."""
    torch.manual_seed(3)
    device = torch.device("meta" if maps.startswith("meta") else "cpu")
    configs = [
        EmbeddingBagConfig(
            name="t0", num_embeddings=rows[0], embedding_dim=8, feature_names=["f0", "f1"]
        ),
        EmbeddingBagConfig(
            name="t1", num_embeddings=rows[1], embedding_dim=6, feature_names=["f2"]
        ),
    ]
    mcc = ManagedCollisionCollection(
        {
            "t0": MCHManagedCollisionModule(
                rows[0], device=device, eviction_policy=LRU_EvictionPolicy(), name="t0"
            ),
            "t1": MCHManagedCollisionModule(
                rows[1],
                device=device,
                eviction_policy=LFU_EvictionPolicy(),
                eviction_interval=2,
                admission=CountThresholdAdmission(threshold=2),
                name="t1",
            ),
        },
        configs,
        num_buckets=BUCKETS,
    )
    fused = {"optimizer": "rowwise_adagrad", "learning_rate": 0.1}
    ebc = EmbeddingBagCollection(configs, fused_params=fused, device=torch.device(tables_on))
    mc = ManagedCollisionEmbeddingBagCollection(ebc, mcc, seed=5)
    if maps == "meta+rng":
        mc._reset_rng_state = mc.reset_rng_state.to("meta")
    return Model(mc)


def plan_of(kind: str, rows: tuple[int, int] = (13, 10)) -> ShardingPlan:
    dims = (8, 6)

    def one(i: int) -> ParameterSharding:
        if kind == "row_wise":
            return row_wise(rows[i], dims[i], WORLD)
        if kind == "table_wise":
            return table_wise((i + 1) % WORLD, rows[i], dims[i])
        return (row_wise, data_parallel)[i](rows[i], dims[i], WORLD)  # mixed

    return ShardingPlan({"mc": {t: one(i) for i, t in enumerate(("t0", "t1"))}})


def batch(step: int, rank: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(900 + step)
    lengths = torch.randint(0, 4, (len(KEYS), TOTAL), generator=g)
    ids = [POOL[torch.randint(0, len(POOL), (int(n),), generator=g)] for n in lengths.sum(1)]
    return GlobalBatch(KEYS, lengths, ids, None, [4, 3]).kjt(rank)


def sharded_mc(model: DistributedModelParallel) -> ShardedManagedCollisionEmbeddings:
    mc = model.module.mc
    assert isinstance(mc, ShardedManagedCollisionEmbeddings)
    return mc


def state(model: DistributedModelParallel) -> dict[str, Any]:
    """Everything a rank holds of the managed module: its buckets' buffers (with their
    devices), every table's counters (the other ranks' buckets' from the mirrors), the reset
    stream, the id maps, the table shards and their optimizer state."""
    mc = sharded_mc(model)
    mcc = mc.managed_collision_collection
    inner = mc.embedding_module
    assert isinstance(inner, ShardedEmbeddingModule)
    held = inner.local_table_shards()
    return {
        "buckets": {
            (t, b): {k: (v.device.type, v.clone()) for k, v in m.state_dict().items()}
            for t, bs in mcc.held_buckets().items()
            for b, m in bs.items()
        },
        "stats": mcc.stats(),
        "rng": mc.get_buffer("_reset_rng_state").clone(),
        "maps": mcc.held_ids(),
        "weights": {t: [s.tensor.detach().clone() for s in ts.weight] for t, ts in held.items()},
        "sums": {
            t: [s.tensor.detach().clone() for s in ts.optimizer_state.get("sum", [])]
            for t, ts in held.items()
        },
    }


def train(model: DistributedModelParallel, env: ShardingEnv) -> dict[str, Any]:
    start = state(model)
    outputs, grads = [], []
    for step in range(STEPS):
        model.zero_grad()
        rows, loss = model(batch(step, env.rank))
        loss.backward()
        outputs.append(rows.detach().clone())
        dense = model.module.dense
        assert isinstance(dense, nn.Linear)
        assert dense.weight.grad is not None
        grads.append(dense.weight.grad.clone())
    return {"start": start, "end": state(model), "outputs": outputs, "grads": grads}


def case_meta_and_cpu(env: ShardingEnv, kind: str, maps: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("cpu", maps):
        model = DistributedModelParallel(build(name), env=env, plan=plan_of(kind))
        out[name] = train(model, env)
    return out


def assert_same(a: Any, b: Any, where: str) -> None:
    """Equal bit for bit (tensors: same dtype, shape and values), recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, where
        assert a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), f"{where}: {a.keys()} {b.keys()}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize(
    ("kind", "maps"),
    [("row_wise", "meta"), ("mixed", "meta"), ("table_wise", "meta+rng")],
)
def test_a_model_built_with_meta_maps_shards_and_trains_as_the_cpu_built_one(
    dist_pool: Any, kind: str, maps: str
) -> None:
    results = dist_pool.run(WORLD, case_meta_and_cpu, kind=kind, maps=maps)
    owners = sorted((t, b) for res in results for t, b in res["cpu"]["start"]["buckets"])
    assert owners == [(t, b) for t in BUCKETS for b in range(BUCKETS[t])]  # each held once
    first = {"t0": 0, "t1": BUCKETS["t0"]}  # global bucket g is on rank g % WORLD
    for rank, res in enumerate(results):
        cpu, meta = res["cpu"], res[maps]
        # Each rank holds its own buckets, on its device, empty as constructed.
        mine = [(t, b) for t, b in owners if (first[t] + b) % WORLD == rank]
        assert sorted(meta["start"]["buckets"]) == mine
        for bucket in meta["start"]["buckets"].values():
            assert {device for device, _ in bucket.values()} == {"cpu"}
        assert_same(meta, cpu, f"rank {rank}")
        # The stream has evictions and admissions (both policies, the admission sketch).
        end = cpu["end"]["stats"]
        assert end["t0"].evicted_total > 0
        assert end["t1"].evicted_total > 0
        assert end["t1"].below_threshold_total > 0
        assert not torch.equal(cpu["start"]["rng"], cpu["end"]["rng"])  # rows were reset


# ---- allocations ------------------------------------------------------------------------------

BIG_ROWS = (400_001, 300_001)  # buckets of 60-100k rows: every map buffer is at least BIG
BIG = 1 << 19


def case_allocations(env: ShardingEnv, maps: str) -> dict[str, Any]:
    """The integer storages of at least BIG bytes that building and sharding make on this rank,
    and those of the buckets it holds (tables on meta: DMP builds their shards, in float)."""
    with record_allocations(BIG) as made:
        built = build(maps, BIG_ROWS, tables_on="meta")
        mc = built.mc
        assert isinstance(mc, ManagedCollisionEmbeddingBagCollection)
        buckets = mc.managed_collision_collection.buckets_by_table()
        model = DistributedModelParallel(built, env=env, plan=plan_of("row_wise", BIG_ROWS))
    held: dict[int, int] = {}
    names: dict[int, str] = {}
    for table, bs in sharded_mc(model).managed_collision_collection.held_buckets().items():
        for index, bucket in bs.items():
            for name, b in bucket.named_buffers():
                storage = b.untyped_storage()
                if storage.nbytes() >= BIG:
                    held[storage.data_ptr()] = storage.nbytes()
                    names[storage.data_ptr()] = f"{table}[{index}].{name}"
    total = sum(
        b.numel() * b.element_size()
        for m in buckets.values()
        for bucket in m
        for b in bucket.buffers()
    )
    # The unsharded collection's buckets: still meta where built there (the held ones are new).
    devices = {b.device.type for m in buckets.values() for bucket in m for b in bucket.buffers()}
    # The integer storages made (a dispatch mode sees factory ops too), by address.
    seen = {a.address: a.nbytes for a in made if a.dtype in (torch.int64, torch.int32)}
    unseen = sorted(names[p] for p in held if p not in seen)
    return {
        "seen": seen,
        "held": held,
        "unseen": unseen,
        "all_buckets_bytes": total,
        "devices": devices,
    }


def test_each_rank_allocates_only_its_own_buckets(dist_pool: Any) -> None:
    meta = dist_pool.run(WORLD, case_allocations, maps="meta")
    for rank, res in enumerate(meta):
        assert res["held"], f"rank {rank} holds no bucket"
        assert not res["unseen"], f"rank {rank}: made outside the dispatch mode?"
        assert res["seen"] == res["held"], f"rank {rank}: allocated beyond its buckets"
        assert sum(res["held"].values()) < 0.7 * res["all_buckets_bytes"]
        assert res["devices"] == {"meta"}
    # The same detection sees a CPU build allocate every bucket on every rank.
    cpu = dist_pool.run(WORLD, case_allocations, maps="cpu")
    for res in cpu:
        assert sum(res["seen"].values()) > sum(res["held"].values())
        assert sum(res["seen"].values()) >= res["all_buckets_bytes"] * 0.9


# ---- dlrm train -------------------------------------------------------------------------------


def test_dlrm_train_with_managed_buckets_runs_at_two_processes(tmp_path: Path) -> None:
    from shardrec_dlrm.cli import main
    from shardrec_dlrm.data.synth_drift import synth_drift

    synth_drift(tmp_path / "d", rows=600, seed=3, live=16, turnover=3.0)
    args = (
        f"train --data {tmp_path / 'd'} --managed-ids lru --managed-buckets 3 --no-shuffle"
        " --embedding-dim 4 --num-embeddings 32 --dense-arch-layer-sizes 8,4"
        " --over-arch-layer-sizes 8,1 --batch-size 32 --optimizer rowwise_adagrad"
        " --learning-rate 0.05 --device cpu --limit-train-batches 4 --limit-val-batches 1"
        f" --limit-test-batches 1 --log-every 1 --logdir {tmp_path / 'tb'} --nproc 2"
    ).split()
    out = CliRunner().invoke(main, args)  # the ranks print to the processes' own stdout
    assert out.exit_code == 0, out.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    # The tables' counters, summed over both ranks' buckets: ids were admitted.
    admitted = [e.value for e in events.Scalars("managed/t_cat_2/admitted_total")]
    assert admitted[-1] > 0
