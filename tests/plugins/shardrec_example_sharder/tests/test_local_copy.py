"""The local_copy sharder against the unsharded module, through shardrec's test kit."""

import pytest

from shardrec import EmbeddingBagConfig
from shardrec.testing import EmbeddingModel, WorkerPool, check_sharding

TABLES = [
    EmbeddingBagConfig(name="t0", num_embeddings=11, embedding_dim=8, feature_names=["f0"]),
    EmbeddingBagConfig(name="t1", num_embeddings=7, embedding_dim=4, feature_names=["f1", "f2"]),
]


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_one_copy_trains_as_the_unsharded_module(
    shardrec_workers: WorkerPool, optimizer: str
) -> None:
    # On one rank the copy is the whole model: outputs, gradients, weights and optimizer state
    # must match; its checkpoint must load unsharded, and as one copy per rank on 2 ranks.
    fused = {"optimizer": optimizer, "learning_rate": 0.1}
    model = EmbeddingModel(tables=TABLES, fused_params=fused)
    check_sharding(
        model, sharding_type="local_copy", world_size=1, reload_world_size=2, pool=shardrec_workers
    )


def test_copies_on_two_ranks_train_apart(shardrec_workers: WorkerPool) -> None:
    # Each rank trains its own copy on its own samples, as local_copy promises: the first outputs
    # match, the trained tables do not, and the report says which.
    report = check_sharding(
        EmbeddingModel(tables=TABLES), sharding_type="local_copy", world_size=2,
        pool=shardrec_workers, raise_on_mismatch=False,
    )  # fmt: skip
    assert not [m for m in report.mismatches if m.what == "output" and m.step == 0]
    assert {m.table for m in report.mismatches if m.what == "weight"} == {"t0", "t1"}
