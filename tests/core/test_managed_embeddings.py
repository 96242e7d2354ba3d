"""Managed-collision embedding modules: raw ids in, the embeddings of their own rows out; evicted
rows restart with fresh weights and zero optimizer state; a run resumed from a state_dict goes on
bit-identically."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    ops,
)
from shardrec.modules.managed_collision import MCHManagedCollisionModule
from shardrec.modules.mc_admission import CountThresholdAdmission
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
)
from shardrec.modules.mc_policies import LRU_EvictionPolicy, TTL_EvictionPolicy

BACKENDS = ["torch"] + (["fbgemm"] if ops.fbgemm_available() else [])


def configs() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="user", num_embeddings=9, embedding_dim=4, feature_names=["u"]),
        EmbeddingBagConfig(
            name="item", num_embeddings=17, embedding_dim=8, feature_names=["i", "j"]
        ),
    ]


def managed_ebc(
    backend: str = "torch", optimizer: str = "sgd", admission: int = 1, seed: int = 0
) -> ManagedCollisionEmbeddingBagCollection:
    torch.manual_seed(seed)
    tables = configs()
    ebc = EmbeddingBagCollection(
        tables, fused_params={"optimizer": optimizer, "learning_rate": 0.1}, backend=backend
    )
    adm = CountThresholdAdmission(admission) if admission > 1 else None
    mcc = ManagedCollisionCollection(
        {
            t.name: MCHManagedCollisionModule(
                t.num_embeddings, eviction_policy=LRU_EvictionPolicy(), admission=adm, name=t.name
            )
            for t in tables
        },
        tables,
    )
    return ManagedCollisionEmbeddingBagCollection(ebc, mcc, return_remapped_features=True)


def raw_batch(step: int, batch: int = 4) -> KeyedJaggedTensor:
    """Raw int64 ids far outside any table (a drifting stream: new ids keep arriving)."""
    gen = torch.Generator().manual_seed(step)
    lengths = torch.randint(0, 4, (3 * batch,), generator=gen)
    base = torch.tensor([10**15, -(10**12), 7 * 10**17])
    values = []
    for k in range(3):
        n = int(lengths[k * batch : (k + 1) * batch].sum())
        values.append(base[k] + torch.randint(step, step + 12, (n,), generator=gen) * 1009)
    return KeyedJaggedTensor(keys=["u", "i", "j"], values=torch.cat(values), lengths=lengths)


def train(model: ManagedCollisionEmbeddingBagCollection, steps: range) -> list[torch.Tensor]:
    outs = []
    for step in steps:
        pooled, _ = model(raw_batch(step))
        (pooled.values() ** 2).sum().backward()
        outs.append(pooled.values().detach().clone())
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_the_embedding_of_each_ids_own_row(backend: str) -> None:
    model = managed_ebc(backend)
    features = raw_batch(0)
    pooled, remapped = model(features)
    assert remapped is not None
    assert torch.equal(remapped.lengths(), features.lengths())
    # Raw ids that differ get rows that differ, per table.
    for table, keys in (("user", ["u"]), ("item", ["i", "j"])):
        raw = torch.cat([features[k].values() for k in keys])
        rows = torch.cat([remapped[k].values() for k in keys])
        assert raw.unique().numel() == rows.unique().numel()
        assert bool((rows < model.stats()[table].capacity).all())
    expected = model.embedding_module(remapped)
    assert torch.equal(pooled.values(), expected.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_evicted_rows_get_fresh_weights_and_zero_optimizer_state(backend: str) -> None:
    model = managed_ebc(backend, optimizer="rowwise_adagrad")
    train(model, range(3))
    lookup = model.embedding_module.lookup
    before = lookup.table_weights()["item"].clone()
    module = model.managed_collision_collection.modules_by_table()["item"]
    held_before = module.held_ids()
    global_rng = torch.get_rng_state()
    model(raw_batch(40))  # all-new ids: the item table evicts
    assert torch.equal(torch.get_rng_state(), global_rng)  # resets use the module's own stream
    held_after = module.held_ids()
    reassigned = sorted(r for i, r in held_after.items() if held_before.get(i) != r)
    assert reassigned, "the batch should have replaced some ids"
    rows = torch.tensor(reassigned)
    weights = lookup.table_weights()["item"]
    bound = (1.0 / 17) ** 0.5
    assert not torch.equal(weights[rows], before[rows])
    assert bool((weights[rows].abs() <= bound).all())
    assert bool((lookup.optimizer_states()["item"]["sum"][rows] == 0).all())
    kept = torch.tensor([r for r in range(16) if r not in reassigned])
    assert torch.equal(weights[kept], before[kept])


def test_the_same_seed_gives_the_same_fresh_weights() -> None:
    a, b = managed_ebc(seed=1), managed_ebc(seed=1)
    assert all(
        torch.equal(x, y) for x, y in zip(train(a, range(6)), train(b, range(6)), strict=True)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_resume_from_a_state_dict_continues_bit_identically(backend: str, optimizer: str) -> None:
    straight = managed_ebc(backend, optimizer, admission=2)
    expected = train(straight, range(10))

    first = managed_ebc(backend, optimizer, admission=2)
    train(first, range(6))
    buffer = io.BytesIO()
    torch.save(
        {"model": first.state_dict(), "optim": first.embedding_module.lookup.optimizer_states()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = managed_ebc(backend, optimizer, admission=2, seed=99)  # other initial weights
    resumed.load_state_dict(saved["model"])
    resumed.embedding_module.lookup.load_optimizer_states(saved["optim"])
    got = train(resumed, range(6, 10))

    for a, b in zip(got, expected[6:], strict=True):
        assert torch.equal(a, b)
    assert resumed.stats() == straight.stats()
    assert straight.stats()["item"].evicted_total > 0
    assert straight.stats()["item"].below_threshold_total > 0
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_state_dict_holds_the_id_maps_and_counters() -> None:
    keys = set(managed_ebc(admission=2).state_dict())
    prefix = "_managed_collision_collection._managed_collision_modules.item."
    for name in ("_map.slots", "_map.row_slots", "_last_read", "_reads", "_counters",
                 "_sketch.counters"):  # fmt: skip
        assert prefix + name in keys
    assert "_embedding_module.embedding_bags.item.weight" in keys
    assert "_reset_rng_state" in keys


def test_embedding_collection_variant_and_a_full_table_is_counted() -> None:
    tables = [EmbeddingConfig(name="t", num_embeddings=4, embedding_dim=3, feature_names=["f"])]
    mcc = ManagedCollisionCollection(
        {"t": MCHManagedCollisionModule(4, eviction_policy=TTL_EvictionPolicy(ttl=5))}, tables
    )
    model = ManagedCollisionEmbeddingCollection(EmbeddingCollection(tables), mcc)
    kjt = KeyedJaggedTensor(
        keys=["f"], values=torch.tensor([5, 6, 7, 8, 5]), lengths=torch.tensor([3, 2])
    )
    out, remapped = model(kjt)
    assert remapped is None
    weights = model.embedding_module.embeddings["t"].weight
    assert torch.equal(out["f"].values(), weights[torch.tensor([0, 1, 2, 3, 0])])
    stats = model.stats()["t"]
    assert (stats.occupancy, stats.rejected_total) == (3, 1)  # 8 read the default row, counted


def test_mismatches_are_named() -> None:
    tables = configs()
    modules = {t.name: MCHManagedCollisionModule(t.num_embeddings) for t in tables}
    with pytest.raises(ValueError, match="table 'item' has no managed collision module"):
        ManagedCollisionCollection({"user": modules["user"]}, tables)
    with pytest.raises(ValueError, match="zch_size must equal num_embeddings"):
        ManagedCollisionCollection({**modules, "user": MCHManagedCollisionModule(5)}, tables)
    shared = [*tables, EmbeddingBagConfig(name="x", num_embeddings=4, embedding_dim=4,
                                          feature_names=["u"])]  # fmt: skip
    with pytest.raises(ValueError, match="feature 'u' is read by tables 'user' and 'x'"):
        ManagedCollisionCollection({**modules, "x": MCHManagedCollisionModule(4)}, shared)
    mcc = ManagedCollisionCollection(modules, tables)
    with pytest.raises(ValueError, match="differ from the managed collision collection"):
        ManagedCollisionEmbeddingBagCollection(EmbeddingBagCollection(tables[:1]), mcc)
    with pytest.raises(ValueError, match="feature 'j' of table 'item' is missing"):
        mcc(
            KeyedJaggedTensor(
                keys=["u", "i"], values=torch.tensor([1]), lengths=torch.tensor([1, 0])
            )
        )


def test_the_project_checkpoint_saves_and_resumes_a_managed_model(tmp_path: Path) -> None:
    from shardrec.distributed import checkpoint

    straight = managed_ebc(optimizer="rowwise_adagrad", admission=2)
    expected = train(straight, range(8))
    first = managed_ebc(optimizer="rowwise_adagrad", admission=2)
    train(first, range(5))
    checkpoint.save(tmp_path, first, step=5)
    resumed = managed_ebc(optimizer="rowwise_adagrad", admission=2, seed=99)
    assert checkpoint.load(tmp_path, resumed) == 5
    got = train(resumed, range(5, 8))
    for a, b in zip(got, expected[5:], strict=True):
        assert torch.equal(a, b)
    assert resumed.stats() == straight.stats()


def test_the_collection_keeps_lengths_weights_and_other_keys_and_takes_int32_ids() -> None:
    tables = [EmbeddingBagConfig(name="t", num_embeddings=5, embedding_dim=4, feature_names=["f"])]
    mcc = ManagedCollisionCollection({"t": MCHManagedCollisionModule(5)}, tables)
    kjt = KeyedJaggedTensor(
        keys=["g", "f"],
        values=torch.tensor([70, 71, 9, 8, 9], dtype=torch.int32),
        weights=torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0]),
        lengths=torch.tensor([1, 1, 2, 1]),
    )
    out = mcc(kjt)
    assert out.keys() == ["g", "f"]
    assert out.values().tolist() == [70, 71, 1, 0, 1]  # g passes through; f: 8 -> 0, 9 -> 1
    assert torch.equal(out.weights(), kjt.weights())
    assert torch.equal(out.lengths(), kjt.lengths())
    empty = KeyedJaggedTensor(
        keys=["f"],
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(2, dtype=torch.int64),
    )
    assert mcc(empty).values().numel() == 0
    assert mcc.stats()["t"].steps == 2


def test_torchrec_style_construction_with_keywords_works_unchanged() -> None:
    from shardrec.modules.mc_policies import LFU_EvictionPolicy

    tables = configs()
    mc_modules = {
        t.name: MCHManagedCollisionModule(
            zch_size=t.num_embeddings,
            device=torch.device("cpu"),
            eviction_policy=LFU_EvictionPolicy(),
            eviction_interval=1,
        )
        for t in tables
    }
    mcc = ManagedCollisionCollection(managed_collision_modules=mc_modules, embedding_configs=tables)
    model = ManagedCollisionEmbeddingBagCollection(
        embedding_bag_collection=EmbeddingBagCollection(tables),
        managed_collision_collection=mcc,
        return_remapped_features=True,
    )
    pooled, remapped = model(raw_batch(3))
    assert pooled.keys() == ["u", "i", "j"]
    assert remapped is not None
    assert mcc.open_slots()["user"] == 8 - len(raw_batch(3)["u"].values().unique())


def test_managed_table_stats_finds_every_managed_table_in_a_model() -> None:
    from shardrec.modules.mc_collection import managed_table_stats

    model = torch.nn.ModuleDict({"a": managed_ebc(), "b": managed_ebc()})
    train(model["a"], range(3))
    stats = managed_table_stats(model)
    # Two collections with tables of the same names: keyed by path.
    assert set(stats) == {
        f"{m}._managed_collision_collection/{t}" for m in "ab" for t in ("user", "item")
    }
    trained = stats["a._managed_collision_collection/item"]
    assert trained == model["a"].stats()["item"]
    assert trained.admitted_total > 0
    assert stats["b._managed_collision_collection/item"].admitted_total == 0
    metrics = trained.as_metrics()
    assert metrics["occupancy"] == trained.occupancy
    assert metrics["occupancy_fraction"] == trained.occupancy / trained.capacity
    assert set(managed_table_stats(model["a"])) == {"user", "item"}


def test_tables_sharded_without_their_managed_module_are_refused() -> None:
    from shardrec.distributed import DistributedModelParallel, ShardingEnv, load_sharder_registry

    # Only the plain EBC/EC sharders: DMP finds the EBC inside the managed module and shards it.
    plain = load_sharder_registry(env={"SHARDREC_PLUGINS": "builtin"}).sharders()
    model = torch.nn.ModuleDict({"mc": managed_ebc()})
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_local(1, 0), sharders=plain)
    with pytest.raises(TypeError, match="shard a managed module whole"):
        dmp.module["mc"](raw_batch(0))
