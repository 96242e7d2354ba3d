"""DLRM and DCNv2 shapes, the interaction maths, and bad configurations."""

from __future__ import annotations

import pytest
import torch

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec_dlrm.model import (
    DLRM,
    DLRMTrain,
    InteractionArch,
    InteractionDCNArch,
    LowRankCrossNet,
    SparseArch,
)

F, D, B = 3, 4, 5


def tiny_ebc(dims: tuple[int, ...] = (D,) * F) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=10, feature_names=[f"cat_{i}"]
            )
            for i, dim in enumerate(dims)
        ]
    )


def tiny_kjt(batch: int = B) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 3, (F * batch,), generator=generator)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"cat_{i}" for i in range(F)],
        values=torch.randint(0, 10, (int(lengths.sum()),), generator=generator),
        lengths=lengths,
    )


@pytest.mark.parametrize("interaction_type", ["dot", "dcn"])
def test_dlrm_maps_a_batch_to_one_logit_per_sample(interaction_type: str) -> None:
    model = DLRM(
        embedding_bag_collection=tiny_ebc(),
        dense_in_features=13,
        dense_arch_layer_sizes=[8, D],
        over_arch_layer_sizes=[6, 1],
        interaction_type=interaction_type,  # type: ignore[arg-type]
        dcn_num_layers=2,
        dcn_low_rank_dim=3,
    )
    logits = model(torch.randn(B, 13), tiny_kjt())
    assert logits.shape == (B, 1)
    loss, detached = DLRMTrain(model)(torch.randn(B, 13), tiny_kjt(), torch.ones(B))
    loss.backward()
    assert detached.shape == (B,)
    table_grad = model.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_0"].weight.grad
    assert table_grad is not None
    assert model.dense_arch.model.layers[0].weight.grad is not None


def test_sparse_arch_stacks_pooled_embeddings_per_feature() -> None:
    ebc = tiny_ebc()
    kjt = tiny_kjt()
    pooled = ebc(kjt).to_dict()
    stacked = SparseArch(ebc)(kjt)
    assert stacked.shape == (B, F, D)
    for i in range(F):
        torch.testing.assert_close(stacked[:, i], pooled[f"cat_{i}"])


def test_dot_interaction_is_the_upper_triangle_of_pairwise_products() -> None:
    dense, sparse = torch.randn(B, D), torch.randn(B, F, D)
    out = InteractionArch(F)(dense, sparse)
    assert out.shape == (B, D + (F + 1) * F // 2)
    torch.testing.assert_close(out[:, :D], dense)
    vectors = [dense] + [sparse[:, i] for i in range(F)]
    expected = [(vectors[i] * vectors[j]).sum(1) for i in range(F + 1) for j in range(i + 1, F + 1)]
    torch.testing.assert_close(out[:, D:], torch.stack(expected, dim=1))


def test_low_rank_cross_layer_follows_the_dcnv2_formula() -> None:
    net = LowRankCrossNet(6, num_layers=2, low_rank=2)
    x0 = torch.randn(B, 6)
    x = x0
    for layer in range(2):
        u, v, b = net.up[layer], net.down[layer], net.bias[layer]
        x = x0 * (u @ (v @ x.T)).T + x0 * b + x
    torch.testing.assert_close(net(x0), x)
    dcn = InteractionDCNArch(F, LowRankCrossNet((F + 1) * D, 1, 2))
    assert dcn(torch.randn(B, D), torch.randn(B, F, D)).shape == (B, (F + 1) * D)


def test_mismatched_dimensions_are_rejected_with_the_tables_named() -> None:
    with pytest.raises(ValueError, match="t_cat_1=8"):
        SparseArch(tiny_ebc((D, 8, D)))
    with pytest.raises(ValueError, match="embedding dimension 4"):
        DLRM(
            embedding_bag_collection=tiny_ebc(),
            dense_in_features=13,
            dense_arch_layer_sizes=[8, 5],
            over_arch_layer_sizes=[1],
        )
    with pytest.raises(ValueError, match="size 1"):
        DLRM(
            embedding_bag_collection=tiny_ebc(),
            dense_in_features=13,
            dense_arch_layer_sizes=[D],
            over_arch_layer_sizes=[2],
        )
