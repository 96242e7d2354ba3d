"""Embedding modules on a variable batch per key: the same as the full batch it stands for.

An EmbeddingBagCollection pools each key's unique samples and expands them through the inverse
indices; outputs, table gradients and the tables after fused-optimizer steps must equal those of
the full batch (up to the order of float sums). An EmbeddingCollection returns each feature's
own rows, as TorchRec's does.
"""

from __future__ import annotations

import pytest
import torch

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from shardrec.kernels import PoolingType
from shardrec.sparse import deduplicate_features

USERS, ITEMS_PER_USER, ROWS = 6, 4, 40


def tables(pooling: PoolingType = PoolingType.SUM) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name="t_user", embedding_dim=4, num_embeddings=ROWS, feature_names=["user", "age"],
            pooling=pooling,
        ),
        EmbeddingBagConfig(
            name="t_item", embedding_dim=3, num_embeddings=ROWS, feature_names=["item", "user"],
            pooling=pooling,
        ),
    ]  # fmt: skip


def user_item_batch(seed: int, weighted: bool = False) -> KeyedJaggedTensor:
    """USERS users with ITEMS_PER_USER items each: a user's features (ids and weights) repeat on
    all their rows. Each user's first id is their number, so no two users look alike."""
    g = torch.Generator().manual_seed(seed)
    batch = USERS * ITEMS_PER_USER

    def jagged(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ids, torch.rand(ids.shape, generator=g)

    users = [
        jagged(torch.cat([torch.tensor([u]), torch.randint(ROWS, (int(n),), generator=g)]))
        for u, n in enumerate(torch.randint(0, 3, (USERS,), generator=g))
    ]
    ages = [jagged(torch.tensor([u + 10])) for u in range(USERS)]
    items = [
        jagged(torch.randint(ROWS, (int(n),), generator=g))
        for n in torch.randint(0, 3, (batch,), generator=g)
    ]
    rows = (
        [u for u in users for _ in range(ITEMS_PER_USER)]
        + [a for a in ages for _ in range(ITEMS_PER_USER)]
        + items
    )
    return KeyedJaggedTensor(
        ["user", "age", "item"],
        torch.cat([ids for ids, _ in rows]),
        weights=torch.cat([w for _, w in rows]) if weighted else None,
        lengths=torch.tensor([ids.numel() for ids, _ in rows], dtype=torch.int32),
    )


@pytest.mark.parametrize(
    ("pooling", "weighted"),
    [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)],
)
def test_ebc_output_and_gradients_equal_the_full_batch(
    pooling: PoolingType, weighted: bool
) -> None:
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables(pooling), is_weighted=weighted)
    full = user_item_batch(1, weighted)
    dedup = deduplicate_features(full, ["user", "age"])
    assert dedup.stride_per_key() == [USERS, USERS, USERS * ITEMS_PER_USER]
    out_full, out_vbe = ebc(full), ebc(dedup)
    assert out_vbe.keys() == out_full.keys()
    torch.testing.assert_close(out_vbe.values(), out_full.values())
    upstream = torch.randn_like(out_full.values())
    grads = []
    for out in (out_full, out_vbe):
        ebc.zero_grad()
        (out.values() * upstream).sum().backward()
        grads.append([p.grad.clone() for p in ebc.parameters() if p.grad is not None])
    assert len(grads[0]) == 2
    for full_grad, vbe_grad in zip(*grads, strict=True):
        torch.testing.assert_close(vbe_grad, full_grad)


@pytest.mark.parametrize("optimizer", ["exact_sgd", "rowwise_adagrad", "adam"])
def test_ebc_fused_steps_equal_the_full_batch(optimizer: str) -> None:
    fused = {"optimizer": optimizer, "learning_rate": 0.05}
    torch.manual_seed(0)
    on_full = EmbeddingBagCollection(tables(), fused_params=fused)
    on_vbe = EmbeddingBagCollection(tables(), fused_params=fused)
    on_vbe.load_state_dict(on_full.state_dict())
    for step in range(3):
        full = user_item_batch(10 + step)
        upstream = torch.randn(full.stride(), 4 + 4 + 3 + 3)
        (on_full(full).values() * upstream).sum().backward()
        (on_vbe(deduplicate_features(full, ["user", "age"])).values() * upstream).sum().backward()
    for name, weight in on_full.state_dict().items():
        torch.testing.assert_close(on_vbe.state_dict()[name], weight, msg=name)
    assert not torch.equal(on_full.state_dict()["embedding_bags.t_user.weight"], torch.zeros(1))


def test_ebc_refuses_a_short_key_without_inverse_indices() -> None:
    ebc = EmbeddingBagCollection(tables())
    dedup = deduplicate_features(user_item_batch(2), ["user"])
    bare = KeyedJaggedTensor(
        dedup.keys(),
        dedup.values(),
        lengths=dedup.lengths(),
        stride_per_key_per_rank=dedup.stride_per_key_per_rank(),
    )
    with pytest.raises(ValueError, match=r"keys \['user'\] have fewer samples than the batch"):
        ebc(bare)


def test_ebc_on_meta_gives_the_full_batch_shape() -> None:
    ebc = EmbeddingBagCollection(tables(), device="meta")
    dedup = deduplicate_features(user_item_batch(3), ["user", "age"])
    assert ebc(dedup).values().shape == (USERS * ITEMS_PER_USER, 14)


def test_ec_returns_each_features_own_rows() -> None:
    torch.manual_seed(0)
    ec = EmbeddingCollection(
        [
            EmbeddingConfig(
                name="t",
                embedding_dim=4,
                num_embeddings=ROWS,
                feature_names=["user", "age", "item"],
            )
        ]
    )
    full = user_item_batch(4)
    dedup = deduplicate_features(full, ["user", "age"])
    out_full, out_vbe = ec(full), ec(dedup)
    inverse = dedup.inverse_indices()[1]
    for k, key in enumerate(dedup.keys()):
        assert out_vbe[key].lengths().numel() == dedup.stride_per_key()[k]
        full_rows = out_full[key].to_dense()
        vbe_rows = out_vbe[key].to_dense()
        for sample, row in enumerate(inverse[k].tolist()):
            torch.testing.assert_close(vbe_rows[row], full_rows[sample])
