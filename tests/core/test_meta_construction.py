"""Modules built on the meta device (``with torch.device("meta"):`` or ``device="meta"``, as
TorchRec users do to plan large models) allocate nothing: their tables are on meta, a forward
gives meta outputs of the right shapes (or a clear error), and ``reset_parameters`` materialises
them."""

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

EBC_TABLES = [
    EmbeddingBagConfig(name="t1", num_embeddings=10, embedding_dim=4, feature_names=["f1"]),
    EmbeddingBagConfig(name="t2", num_embeddings=7, embedding_dim=8, feature_names=["f2"]),
]
EC_TABLES = [
    EmbeddingConfig(name="t1", num_embeddings=10, embedding_dim=4, feature_names=["f1"]),
    EmbeddingConfig(name="t2", num_embeddings=7, embedding_dim=4, feature_names=["f2"]),
]
VALUES = torch.tensor([1, 2, 3, 4, 5])
LENGTHS = torch.tensor([2, 1, 0, 2])


def build(kind: str, how: str) -> torch.nn.Module:
    if how == "context":
        with torch.device("meta"):
            if kind == "ebc":
                return EmbeddingBagCollection(tables=EBC_TABLES)
            return EmbeddingCollection(tables=EC_TABLES)
    if kind == "ebc":
        return EmbeddingBagCollection(tables=EBC_TABLES, device=torch.device("meta"))
    return EmbeddingCollection(tables=EC_TABLES, device=torch.device("meta"))


@pytest.mark.parametrize("how", ["context", "argument"])
@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_tables_built_on_meta_stay_on_meta(kind: str, how: str) -> None:
    module = build(kind, how)
    assert [p.device.type for p in module.parameters()] == ["meta", "meta"]
    assert all(v.is_meta for v in module.state_dict().values())


@pytest.mark.parametrize("how", ["context", "argument"])
def test_a_pooled_forward_on_meta_gives_the_output_shape(how: str) -> None:
    module = build("ebc", how)
    for device in ("meta", "cpu"):
        kjt = KeyedJaggedTensor(
            keys=["f1", "f2"], values=VALUES.to(device), lengths=LENGTHS.to(device)
        )
        out = module(kjt)
        assert out.values().is_meta
        assert tuple(out.values().shape) == (2, 12)
        assert out.keys() == ["f1", "f2"]


def test_a_sequence_forward_on_meta_needs_the_ids_per_key() -> None:
    module = build("ec", "context")
    meta_values, meta_lengths = VALUES.to("meta"), LENGTHS.to("meta")
    sized = KeyedJaggedTensor(
        keys=["f1", "f2"], values=meta_values, lengths=meta_lengths, length_per_key=[3, 2]
    )
    out = module(sized)
    assert [tuple(out[k].values().shape) for k in ("f1", "f2")] == [(3, 4), (2, 4)]
    assert all(out[k].values().is_meta for k in ("f1", "f2"))
    unsized = KeyedJaggedTensor(keys=["f1", "f2"], values=meta_values, lengths=meta_lengths)
    with pytest.raises(ValueError, match="meta device and has no length_per_key"):
        module(unsized)


def test_a_meta_batch_on_real_tables_is_refused_clearly() -> None:
    module = EmbeddingBagCollection(tables=EBC_TABLES)
    kjt = KeyedJaggedTensor(
        keys=["f1", "f2"], values=VALUES.to("meta"), lengths=LENGTHS.to("meta"),
        length_per_key=[3, 2],
    )  # fmt: skip
    with pytest.raises(ValueError, match="the batch is on the meta device but the tables are on"):
        module(kjt)


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_reset_parameters_materialises_what_was_built_under_the_meta_context(kind: str) -> None:
    module = build(kind, "context")
    module.reset_parameters()  # type: ignore[operator]
    assert [p.device.type for p in module.parameters()] == ["cpu", "cpu"]
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=VALUES, lengths=LENGTHS)
    out = module(kjt)
    rows = out.values() if kind == "ebc" else out["f1"].values()
    assert rows.device.type == "cpu"
    assert bool(torch.isfinite(rows).all())
