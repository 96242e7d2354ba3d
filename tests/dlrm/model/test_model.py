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


def test_dot_interaction_gradients_match_autograd_through_the_plain_formula() -> None:
    dense = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    sparse = torch.randn(B, F, D, dtype=torch.float64, requires_grad=True)
    arch = InteractionArch(F)
    torch.autograd.gradcheck(arch, (dense, sparse))

    def plain(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        vectors = torch.cat([dense.unsqueeze(1), sparse], dim=1)
        rows, cols = torch.triu_indices(F + 1, F + 1, offset=1)
        return torch.cat([dense, (vectors @ vectors.transpose(1, 2))[:, rows, cols]], dim=1)

    grad_out = torch.randn(B, D + (F + 1) * F // 2, dtype=torch.float64)
    ours = torch.autograd.grad(arch(dense, sparse), (dense, sparse), grad_out)
    theirs = torch.autograd.grad(plain(dense, sparse), (dense, sparse), grad_out)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want)


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


@pytest.mark.parametrize("interaction_type", ["dot", "dcn"])
def test_bf16_dense_precision_runs_the_dense_layers_in_bf16_and_returns_fp32(
    interaction_type: str,
) -> None:
    def build(precision: str) -> DLRM:
        torch.manual_seed(0)
        return DLRM(
            embedding_bag_collection=tiny_ebc(),
            dense_in_features=13,
            dense_arch_layer_sizes=[32, D],
            over_arch_layer_sizes=[16, 1],
            interaction_type=interaction_type,  # type: ignore[arg-type]
            dcn_num_layers=2,
            dcn_low_rank_dim=3,
            dense_precision=precision,  # type: ignore[arg-type]
        )

    exact, mixed = build("fp32"), build("bf16")
    seen: list[torch.dtype] = []
    mixed.over_arch.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    dense, kjt = torch.randn(64, 13, generator=torch.Generator().manual_seed(1)), tiny_kjt(64)
    want, got = exact(dense, kjt), mixed(dense, kjt)
    assert seen == [torch.bfloat16]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    got.sum().backward()
    for name, param in mixed.named_parameters():
        assert param.dtype == torch.float32, name
        assert param.grad is not None, name
        assert param.grad.dtype == torch.float32, name


def test_dot_interaction_under_bf16_autocast_runs_in_fp32() -> None:
    dense = torch.randn(64, D, requires_grad=True)
    sparse = torch.randn(64, F, D, requires_grad=True)
    grad_out = torch.randn(64, D + (F + 1) * F // 2)
    arch = InteractionArch(F)
    want_out = arch(dense, sparse)
    want = torch.autograd.grad(want_out, (dense, sparse), grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = arch(dense.bfloat16(), sparse)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want_out, rtol=0.02, atol=0.02)
    got = torch.autograd.grad(out, (dense, sparse), grad_out)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0.02, atol=0.02 * float(w.abs().mean()))


def test_unknown_dense_precision_is_rejected() -> None:
    with pytest.raises(ValueError, match="dense_precision must be one of fp32, bf16"):
        DLRM(
            embedding_bag_collection=tiny_ebc(),
            dense_in_features=13,
            dense_arch_layer_sizes=[8, D],
            over_arch_layer_sizes=[6, 1],
            dense_precision="fp16",  # type: ignore[arg-type]
        )
