"""EmbeddingCollection: one row per id, tables of any (mixed) dim, TorchRec's keys and layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor


def tables() -> list[EmbeddingConfig]:
    return [
        EmbeddingConfig(name="a", num_embeddings=9, embedding_dim=1, feature_names=["x"]),
        EmbeddingConfig(name="b", num_embeddings=6, embedding_dim=3, feature_names=["y", "x"]),
        EmbeddingConfig(name="c", num_embeddings=5, embedding_dim=5, feature_names=["z"]),
    ]


def kjt(seed: int = 0, batch: int = 3) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    rows = [6, 6, 5]
    lengths = torch.randint(0, 4, (3 * batch,), generator=gen)
    values = [
        torch.randint(0, n, (int(lengths[i * batch : (i + 1) * batch].sum()),), generator=gen)
        for i, n in enumerate(rows)
    ]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["x", "y", "z"], values=torch.cat(values), lengths=lengths
    )


def test_rows_per_id_with_mixed_dims() -> None:
    ec = EmbeddingCollection(tables=tables())
    features = kjt()
    out = ec(features)
    assert list(out) == ["x@a", "y", "x@b", "z"]
    weights = {n: m.weight.detach() for n, m in ec.embeddings.items()}
    for key, table, feature in [("x@a", "a", "x"), ("y", "b", "y"), ("x@b", "b", "x"),
                                ("z", "c", "z")]:  # fmt: skip
        jt = out[key]
        assert isinstance(jt, JaggedTensor)
        assert torch.equal(jt.lengths(), features[feature].lengths())
        torch.testing.assert_close(jt.values(), weights[table][features[feature].values()])
        assert jt.weights_or_none() is None


def test_need_indices_puts_ids_in_weights() -> None:
    ec = EmbeddingCollection(tables=tables(), need_indices=True)
    assert ec.need_indices()
    features = kjt(seed=2)
    out = ec(features)
    assert torch.equal(out["z"].weights(), features["z"].values())


def test_gradients_match_nn_embedding() -> None:
    ec = EmbeddingCollection(tables=tables())
    ref = nn.ModuleDict({t.name: nn.Embedding(t.num_embeddings, t.embedding_dim) for t in tables()})
    ref.load_state_dict({k.removeprefix("embeddings."): v for k, v in ec.state_dict().items()})
    features = kjt(seed=1)
    out = ec(features)
    total = sum((v.values() * (i + 1)).sum() for i, v in enumerate(out.values()))
    ref_total = (
        ref["a"](features["x"].values()).sum()
        + 2 * ref["b"](features["y"].values()).sum()
        + 3 * ref["b"](features["x"].values()).sum()
        + 4 * ref["c"](features["z"].values()).sum()
    )
    torch.testing.assert_close(total, ref_total)
    total.backward()  # type: ignore[union-attr]
    ref_total.backward()
    for name in ("a", "b", "c"):
        grad = ec.embeddings[name].weight.grad
        assert grad is not None
        torch.testing.assert_close(grad, ref[name].weight.grad)


def test_state_dict_keys_and_load() -> None:
    ec = EmbeddingCollection(tables=tables())
    keys = ["embeddings.a.weight", "embeddings.b.weight", "embeddings.c.weight"]
    assert list(ec.state_dict()) == keys
    new = {k: torch.randn_like(v) for k, v in ec.state_dict().items()}
    ec.load_state_dict(new)
    out = ec(kjt(seed=3))
    torch.testing.assert_close(out["z"].values(), new["embeddings.c.weight"][kjt(3)["z"].values()])


def test_fused_adam_moves_only_touched_rows() -> None:
    ec = EmbeddingCollection(
        tables=tables(), fused_params={"optimizer": "adam", "learning_rate": 0.1}
    )
    before = {n: m.weight.detach().clone() for n, m in ec.embeddings.items()}
    features = kjt(seed=5)
    sum(v.values().sum() for v in ec(features).values()).backward()  # type: ignore[union-attr]
    touched_c = torch.unique(features["z"].values())
    after = ec.embeddings["c"].weight.detach()
    moved = (after != before["c"]).any(dim=1).nonzero().flatten()
    assert torch.equal(moved, touched_c)
    states = ec.lookup.optimizer_states()["c"]
    assert set(states) == {"exp_avg", "exp_avg_sq", "step"}
    assert int(states["step"]) == 1


def test_embedding_dim_is_torchrecs_when_dims_agree() -> None:
    same = [EmbeddingConfig(name=n, num_embeddings=4, embedding_dim=6, feature_names=[n])
            for n in ("p", "q")]  # fmt: skip
    assert EmbeddingCollection(tables=same).embedding_dim() == 6
    with pytest.raises(ValueError, match=r"several dims \[1, 3, 5\]"):
        EmbeddingCollection(tables=tables()).embedding_dim()


def test_meta_then_reset() -> None:
    ec = EmbeddingCollection(tables=tables(), device="meta")
    assert all(p.is_meta for p in ec.parameters())
    ec.reset_parameters()
    assert ec.device.type == "cpu"
    assert ec(kjt())["z"].values().shape[1] == 5


def test_errors_name_feature_and_table() -> None:
    ec = EmbeddingCollection(tables=tables())
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["x", "y", "z"], values=torch.tensor([0, 6, 1]), lengths=torch.tensor([1, 1, 1])
    )
    with pytest.raises(ValueError, match=r"id 6 of feature 'y' .* is out of range for table 'b'"):
        ec(bad)
    dup = [EmbeddingConfig(name="a", num_embeddings=2, embedding_dim=2, feature_names=["x"])] * 2
    with pytest.raises(ValueError, match="duplicate table name 'a'"):
        EmbeddingCollection(tables=dup)
