"""A bucketed managed table built on the meta device (for the planner): ``make_buckets`` gives
the buckets a CPU build gives, buffer for buffer, without memory, and the managed sharder's
per-rank estimate of the maps is the same from either build."""

from __future__ import annotations

import pytest
import torch

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig
from shardrec.modules.managed_collision import MCHManagedCollisionModule
from shardrec.modules.mc_admission import CountThresholdAdmission
from shardrec.modules.mc_buckets import BucketLayout, make_buckets
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from shardrec.modules.mc_policies import LFU_EvictionPolicy, LRU_EvictionPolicy
from shardrec_sharders.managed_collision import ManagedCollisionSharder

ROWS = 1001


def template(device: str, admission: CountThresholdAdmission | None) -> MCHManagedCollisionModule:
    return MCHManagedCollisionModule(
        ROWS,
        device=device,
        eviction_policy=LFU_EvictionPolicy(),
        eviction_interval=3,
        admission=admission,
        name="t",
    )


def layout_of(module: MCHManagedCollisionModule) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(b.shape), b.dtype) for n, b in module.named_buffers()]


@pytest.mark.parametrize("admission", [None, CountThresholdAdmission(threshold=2)])
def test_three_buckets_on_meta_have_the_cpu_buckets_buffers(
    admission: CountThresholdAdmission | None,
) -> None:
    layout = BucketLayout(ROWS, 3)
    on_meta = make_buckets(template("meta", admission), layout, "t")
    on_cpu = make_buckets(template("cpu", admission), layout, "t")
    assert len(on_meta) == len(on_cpu) == 3
    for meta_bucket, cpu_bucket in zip(on_meta, on_cpu, strict=True):
        assert layout_of(meta_bucket) == layout_of(cpu_bucket)
        assert all(b.is_meta for b in meta_bucket.buffers())
        assert meta_bucket.output_size() == cpu_bucket.output_size()
        assert isinstance(meta_bucket.eviction_policy, LFU_EvictionPolicy)
        assert meta_bucket.eviction_interval == 3
        assert meta_bucket.admission == admission
    # The buckets differ in size (capacity 1000 = 334 + 333 + 333): the shapes above are not
    # one bucket's repeated.
    assert [m.output_size() for m in on_meta] == [335, 334, 334]


def test_a_trained_cpu_template_is_still_refused() -> None:
    module = template("cpu", None)
    module.train()
    module(torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="trained already"):
        make_buckets(module, BucketLayout(ROWS, 3), "t")


def managed(device: str, buckets: int) -> ManagedCollisionEmbeddingBagCollection:
    configs = [
        EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=4, feature_names=[f"f_{n}"])
        for n, r in (("t0", ROWS), ("t1", 77))
    ]
    modules = {
        c.name: MCHManagedCollisionModule(
            c.num_embeddings, device=device, eviction_policy=LRU_EvictionPolicy(), name=c.name
        )
        for c in configs
    }
    mcc = ManagedCollisionCollection(modules, configs, num_buckets=buckets)
    ebc = EmbeddingBagCollection(configs, device=torch.device(device))
    return ManagedCollisionEmbeddingBagCollection(ebc, mcc)


def test_the_planners_estimate_of_the_maps_is_the_same_from_meta_and_cpu_builds() -> None:
    on_meta, on_cpu = managed("meta", 3), managed("cpu", 3)
    assert all(b.is_meta for b in on_meta.managed_collision_collection.buffers())
    sharder = ManagedCollisionSharder(ManagedCollisionEmbeddingBagCollection)
    from_meta = sharder.planner_rank_state(on_meta, 2)
    from_cpu = sharder.planner_rank_state(on_cpu, 2)
    assert from_meta == from_cpu
    assert len(from_meta) == 6  # 3 buckets of each table
    assert sum(s.nbytes for s in from_meta) > 0
