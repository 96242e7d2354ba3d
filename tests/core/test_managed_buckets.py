"""Managed tables split into buckets (``ManagedCollisionCollection(num_buckets=...)``): the
layout, the bucket hash, and a bucketed table against its buckets stepped by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardrec import EmbeddingBagCollection, KeyedJaggedTensor
from shardrec.distributed.checkpoint import CheckpointError, load, save
from shardrec.modules.configs import EmbeddingBagConfig
from shardrec.modules.managed_collision import MCHManagedCollisionModule
from shardrec.modules.mc_admission import CountThresholdAdmission
from shardrec.modules.mc_buckets import BucketLayout
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from shardrec.modules.mc_id_map import hash_slots
from shardrec.modules.mc_policies import LFU_EvictionPolicy, LRU_EvictionPolicy


def configs(rows: int = 23) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name="t", num_embeddings=rows, embedding_dim=4, feature_names=["f"])]


def collection(buckets: int, rows: int = 23, **kwargs: object) -> ManagedCollisionCollection:
    module = MCHManagedCollisionModule(rows, name="t", **kwargs)  # type: ignore[arg-type]
    return ManagedCollisionCollection({"t": module}, configs(rows), num_buckets=buckets)


def kjt(ids: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=["f"], values=ids, lengths=torch.ones(ids.numel(), dtype=torch.int64)
    )


def test_layout_cuts_the_capacity_into_ranges_that_differ_by_at_most_one() -> None:
    layout = BucketLayout(23, 5)  # capacity 22: 5, 5, 4, 4, 4
    sizes = [layout.size(b) for b in range(5)]
    assert sizes == [5, 5, 4, 4, 4]
    assert [layout.first_row(b) for b in range(5)] == [0, 5, 10, 14, 18]
    assert layout.default_row == 22
    rows = torch.tensor([0, 3, layout.size(3)])  # the last: the bucket's own default row
    assert layout.table_rows(3, rows).tolist() == [14, 17, 22]
    with pytest.raises(ValueError, match="at most 22 buckets"):
        BucketLayout(23, 23)
    with pytest.raises(ValueError, match="num_buckets"):
        BucketLayout(23, 0)


def test_bucket_hash_spreads_ids_and_is_unrelated_to_the_slot_hash() -> None:
    layout = BucketLayout(1001, 4)
    ids = torch.arange(-20_000, 20_000) * 7919  # structured ids
    bucket = layout.bucket_of(ids)
    counts = torch.bincount(bucket, minlength=4)
    assert int(counts.min()) > 0.9 * ids.numel() / 4
    # Within one bucket, the id map's home slots still cover the slots evenly.
    slots = hash_slots(ids[bucket == 0], 6)
    per_slot = torch.bincount(slots, minlength=64).float()
    assert float(per_slot.std() / per_slot.mean()) < 0.2
    extremes = torch.tensor([-(2**63), -1, 0, 2**63 - 1])
    assert bool(((layout.bucket_of(extremes) >= 0) & (layout.bucket_of(extremes) < 4)).all())


def test_one_bucket_is_the_module_itself() -> None:
    module = MCHManagedCollisionModule(23, name="t")
    mcc = ManagedCollisionCollection({"t": module}, configs())
    assert mcc.modules_by_table()["t"] is module
    assert all(k.startswith("_managed_collision_modules.t._") for k in mcc.state_dict())
    ids = torch.tensor([5, 9_137_702_141, 5, -3])
    rows = mcc(kjt(ids)).values()
    assert rows.tolist() == [1, 2, 1, 0]  # new ids take the lowest free rows, in id order


@pytest.mark.parametrize("policy", [LRU_EvictionPolicy(), LFU_EvictionPolicy()])
def test_a_bucketed_table_steps_each_bucket_on_its_own_ids(policy: object) -> None:
    buckets = 3
    mcc = collection(buckets, eviction_policy=policy, admission=CountThresholdAdmission(2))
    layout = mcc.bucket_layouts()["t"]
    by_hand = [
        MCHManagedCollisionModule(
            layout.size(b) + 1,
            eviction_policy=policy,  # type: ignore[arg-type]
            admission=CountThresholdAdmission(2),
        )
        for b in range(buckets)
    ]
    g = torch.Generator().manual_seed(4)
    evicted_any = False
    for _ in range(12):
        ids = torch.randint(-40, 40, (30,), generator=g) * 1_000_003
        rows = mcc(kjt(ids)).values()
        bucket = layout.bucket_of(ids)
        expected = torch.empty_like(ids)
        for b, m in enumerate(by_hand):
            at = (bucket == b).nonzero().squeeze(1)
            local = m(ids[at])  # also a step on no ids: every bucket steps every time
            expected[at] = torch.where(
                local == layout.size(b), layout.default_row, local + layout.first_row(b)
            )
        assert rows.tolist() == expected.tolist()
        evicted = mcc.evict()["t"]
        hand = [m.evict() for m in by_hand]
        pieces = [r + layout.first_row(b) for b, r in enumerate(hand) if r is not None]
        if pieces:
            evicted_any = True
            assert evicted is not None
            assert evicted.tolist() == torch.cat(pieces).tolist()
            assert evicted.tolist() == sorted(evicted.tolist())
        else:
            assert evicted is None
    assert evicted_any
    stats = mcc.stats()["t"]
    assert stats.capacity == 22
    assert stats.steps == 12
    assert stats.admitted_total == sum(m.stats().admitted_total for m in by_hand)
    assert stats.evicted_total == sum(m.stats().evicted_total for m in by_hand)
    assert stats.occupancy == sum(m.stats().occupancy for m in by_hand)
    assert stats.below_threshold_total == sum(m.stats().below_threshold_total for m in by_hand)
    held = mcc.held_ids()["t"]
    assert len(held) == stats.occupancy
    assert len(set(held.values())) == len(held)  # no two ids on one row
    for i, row in held.items():
        b = int(layout.bucket_of(torch.tensor([i]))[0])
        assert layout.first_row(b) <= row < layout.first_row(b) + layout.size(b)


def test_a_bucketed_model_resumes_from_its_state_dict() -> None:
    def model() -> ManagedCollisionEmbeddingBagCollection:
        torch.manual_seed(0)
        mcc = collection(4, eviction_policy=LRU_EvictionPolicy())
        ebc = EmbeddingBagCollection(configs(), fused_params={"optimizer": "exact_adagrad"})
        return ManagedCollisionEmbeddingBagCollection(ebc, mcc, seed=3)

    def batch(step: int) -> KeyedJaggedTensor:
        return kjt(torch.randint(0, 60, (25,), generator=torch.Generator().manual_seed(step)))

    straight, first = model(), model()
    for step in range(6):
        straight(batch(step))[0].values().sum().backward()
        if step < 3:
            first(batch(step))[0].values().sum().backward()
    keys = first.state_dict().keys()
    assert "_managed_collision_collection._managed_collision_modules.t.3._map.slots" in keys
    resumed = model()
    resumed.load_state_dict(first.state_dict())
    lookup = first.embedding_module.lookup
    resumed.embedding_module.lookup.load_optimizer_states(lookup.optimizer_states())
    for step in range(3, 6):
        resumed(batch(step))[0].values().sum().backward()
    assert resumed.stats() == straight.stats()
    assert straight.stats()["t"].evicted_total > 0
    assert resumed.managed_collision_collection.held_ids() == (
        straight.managed_collision_collection.held_ids()
    )
    torch.testing.assert_close(
        resumed.embedding_module.lookup.table_weights()["t"],
        straight.embedding_module.lookup.table_weights()["t"],
        atol=0,
        rtol=0,
    )


def test_bad_bucket_settings_are_refused_naming_the_table() -> None:
    with pytest.raises(ValueError, match=r"table 't'.*at most 22 buckets"):
        collection(40)
    with pytest.raises(ValueError, match=r"num_buckets names tables \['u'\]"):
        ManagedCollisionCollection(
            {"t": MCHManagedCollisionModule(23)}, configs(), num_buckets={"u": 2}
        )
    trained = MCHManagedCollisionModule(23)
    trained(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"'t'.*trained already"):
        ManagedCollisionCollection({"t": trained}, configs(), num_buckets=2)
    with pytest.raises(ValueError, match=r"\['t'\] are split into buckets.*buckets_by_table"):
        collection(2).modules_by_table()


def test_a_checkpoint_loads_only_with_the_same_buckets(tmp_path: Path) -> None:
    def model(buckets: int) -> ManagedCollisionEmbeddingBagCollection:
        ebc = EmbeddingBagCollection(configs(), fused_params={"optimizer": "exact_adagrad"})
        return ManagedCollisionEmbeddingBagCollection(ebc, collection(buckets))

    saved = model(4)
    saved(kjt(torch.arange(10)))[0].values().sum().backward()
    save(tmp_path, saved, step=1)
    same = model(4)
    assert load(tmp_path, same) == 1
    assert same.managed_collision_collection.held_ids() == (
        saved.managed_collision_collection.held_ids()
    )
    for other in (1, 3):
        with pytest.raises(
            CheckpointError, match=r"(?s)does not match the model.*_managed_collision_modules\.t\."
        ):
            load(tmp_path, model(other))
