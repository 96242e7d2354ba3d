"""A managed table that trained on and then loads an older checkpoint goes on exactly like a
fresh model loading it: the load drops what the table kept from its own later state (the spare
eviction candidates of its last scan), through ``state_loaded()``."""

from __future__ import annotations

from pathlib import Path

import torch

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.distributed.checkpoint import load, save
from shardrec.modules.managed_collision import MCHManagedCollisionModule
from shardrec.modules.mc_collection import ManagedCollisionCollection
from shardrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from shardrec.modules.mc_policies import LRU_EvictionPolicy

ROWS = 1025  # 1024 rows for ids, the last the default row


def _managed(seed: int = 0) -> ManagedCollisionEmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name="t", num_embeddings=ROWS, embedding_dim=4, feature_names=["f"])
    ]
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(
        tables, fused_params={"optimizer": "rowwise_adagrad", "learning_rate": 0.1}
    )
    mcc = ManagedCollisionCollection(
        {"t": MCHManagedCollisionModule(ROWS, eviction_policy=LRU_EvictionPolicy(), name="t")},
        tables,
    )
    return ManagedCollisionEmbeddingBagCollection(ebc, mcc, return_remapped_features=True)


def _batches(steps: int) -> list[KeyedJaggedTensor]:
    """Steps 0-3 fill the table with 4 x 256 ids; then each step brings 3 new ids, so each
    eviction run needs 3 rows and a scan keeps spare candidates for the next runs. Step 7 also
    reads ids 0-100, the oldest: the candidates the trained model keeps after step 11 are rows
    it did not read since step 6, but rows that hold ids 0-100 are older than them in the state
    of step 6."""
    out = []
    for step in range(steps):
        if step < 4:
            ids = torch.arange(step * 256, (step + 1) * 256)
        else:
            ids = torch.arange(10_000 + 3 * step, 10_003 + 3 * step)
            if step == 7:
                ids = torch.cat([ids, torch.arange(101)])
        lengths = torch.ones(ids.numel(), dtype=torch.int64)
        out.append(KeyedJaggedTensor(keys=["f"], values=ids, lengths=lengths))
    return out


def _step(model: ManagedCollisionEmbeddingBagCollection, batch: KeyedJaggedTensor) -> torch.Tensor:
    pooled, remapped = model(batch)
    pooled.values().sum().backward()
    assert remapped is not None
    rows: torch.Tensor = remapped.values()
    return rows


def _weights(model: ManagedCollisionEmbeddingBagCollection) -> torch.Tensor:
    weight: torch.Tensor = model.state_dict()["_embedding_module.embedding_bags.t.weight"]
    return weight.clone()


def test_a_trained_managed_table_loading_a_checkpoint_goes_on_as_a_fresh_one(
    tmp_path: Path,
) -> None:
    batches = _batches(16)
    trained = _managed()
    for batch in batches[:6]:
        _step(trained, batch)
    assert trained.stats()["t"].evicted_total > 0
    save(tmp_path, trained, step=6)
    for batch in batches[6:12]:  # evictions that keep candidates for the next runs
        _step(trained, batch)
    fresh = _managed(seed=1)
    assert load(tmp_path, trained) == 6
    assert load(tmp_path, fresh) == 6
    for step, batch in enumerate(batches[6:], start=6):
        rows_t, rows_f = _step(trained, batch), _step(fresh, batch)
        assert torch.equal(rows_t, rows_f), step
        mcc_t = trained.managed_collision_collection
        mcc_f = fresh.managed_collision_collection
        assert mcc_t.held_ids() == mcc_f.held_ids(), step
        assert torch.equal(_weights(trained), _weights(fresh)), step
    assert trained.stats() == fresh.stats()
