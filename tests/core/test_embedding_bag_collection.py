"""EmbeddingBagCollection behaves like TorchRec's: same outputs as one nn.EmbeddingBag per table,
same state-dict keys, meta construction, and errors that name the feature and the table."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from shardrec import (
    DataType,
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingConfig,
    KeyedJaggedTensor,
    KeyedTensor,
    PoolingType,
    ops,
)


def tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t1", num_embeddings=10, embedding_dim=4, feature_names=["f1"]),
        EmbeddingBagConfig(
            name="t2", num_embeddings=7, embedding_dim=8, feature_names=["f2", "f1"],
            pooling=PoolingType.MEAN,
        ),
        EmbeddingBagConfig(name="t3", num_embeddings=5, embedding_dim=4, feature_names=["f3"]),
    ]  # fmt: skip


def kjt(keys: list[str] | None = None, seed: int = 0, batch: int = 4) -> KeyedJaggedTensor:
    """Random bags (lengths 0..3, so some are empty) for the features f1, f2, f3 (rows 7, 7, 5)."""
    keys = keys or ["f1", "f2", "f3"]
    rows = {"f1": 7, "f2": 7, "f3": 5}
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=gen)
    values = [
        torch.randint(0, rows[k], (int(lengths[i * batch : (i + 1) * batch].sum()),), generator=gen)
        for i, k in enumerate(keys)
    ]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat(values),
        lengths=lengths,
        weights=torch.rand(int(lengths.sum()), generator=gen),
    )


class TorchRecLike(nn.Module):
    """The unsharded TorchRec layout: one nn.EmbeddingBag per table under ``embedding_bags``."""

    def __init__(self, configs: list[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.configs = configs
        self.embedding_bags = nn.ModuleDict(
            {
                c.name: nn.EmbeddingBag(c.num_embeddings, c.embedding_dim, mode=c.pooling.lower())
                for c in configs
            }
        )

    def forward(self, features: KeyedJaggedTensor, weighted: bool = False) -> torch.Tensor:
        outs = []
        for c in self.configs:
            for f in c.feature_names:
                jt = features[f]
                psw = jt.weights() if weighted else None
                bag = self.embedding_bags[c.name]
                outs.append(bag(jt.values(), jt.offsets()[:-1], per_sample_weights=psw))
        return torch.cat(outs, dim=1)


def test_forward_matches_one_embedding_bag_per_table() -> None:
    ebc = EmbeddingBagCollection(tables=tables())
    ref = TorchRecLike(tables())
    ref.load_state_dict(ebc.state_dict())
    features = kjt()
    out = ebc(features)
    assert isinstance(out, KeyedTensor)
    # A feature read by two tables is named feature@table; keys in table order.
    assert out.keys() == ["f1@t1", "f2", "f1@t2", "f3"]
    assert out.length_per_key() == [4, 8, 8, 4]
    torch.testing.assert_close(out.values(), ref(features))


def test_input_key_order_does_not_matter() -> None:
    ebc = EmbeddingBagCollection(tables=tables())
    a = ebc(kjt(["f1", "f2", "f3"], seed=4))
    permuted = kjt(["f1", "f2", "f3"], seed=4).permute([2, 0, 1])
    assert permuted.keys() == ["f3", "f1", "f2"]
    torch.testing.assert_close(ebc(permuted).values(), a.values())


def test_weighted_uses_kjt_weights() -> None:
    configs = [
        EmbeddingBagConfig(name="t1", num_embeddings=10, embedding_dim=4, feature_names=["f1"]),
        EmbeddingBagConfig(name="t3", num_embeddings=5, embedding_dim=4, feature_names=["f3"]),
    ]
    ebc = EmbeddingBagCollection(tables=configs, is_weighted=True)
    assert ebc.is_weighted()
    ref = TorchRecLike(configs)
    ref.load_state_dict(ebc.state_dict())
    features = kjt(["f1", "f3"], seed=2)
    torch.testing.assert_close(ebc(features).values(), ref(features, weighted=True))
    unweighted = KeyedJaggedTensor.from_lengths_sync(
        keys=["f1", "f3"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1])
    )
    with pytest.raises(ValueError, match="has no weights"):
        ebc(unweighted)


def test_plain_mode_trains_like_embedding_bags_with_sgd() -> None:
    ebc = EmbeddingBagCollection(tables=tables())
    ref = TorchRecLike(tables())
    ref.load_state_dict(ebc.state_dict())
    opt = torch.optim.SGD(ebc.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(3):
        features = kjt(seed=10 + step)
        grad = torch.randn(4, 24)
        ebc(features).values().backward(grad)
        ref(features).backward(grad)
        for name in ("t1", "t2", "t3"):
            torch.testing.assert_close(
                ebc.embedding_bags[name].weight.grad, ref.embedding_bags[name].weight.grad
            )
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for key, value in ebc.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key])


@pytest.mark.parametrize("backend", ["torch", "fbgemm"])
def test_fused_sgd_matches_plain_sgd(backend: str) -> None:
    if backend == "fbgemm" and not ops.fbgemm_available():
        pytest.skip("fbgemm_gpu is not importable here (absent or hidden by SHARDREC_HIDE_FBGEMM)")
    fused = EmbeddingBagCollection(
        tables=tables(), fused_params={"optimizer": "exact_sgd", "learning_rate": 0.5},
        backend=backend,
    )  # fmt: skip
    assert fused.lookup.backend.value == backend
    plain = EmbeddingBagCollection(tables=tables())
    plain.load_state_dict(fused.state_dict())
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    for step in range(3):
        features = kjt(seed=step)
        grad = torch.randn(4, 24)
        fused(features).values().backward(grad)
        plain(features).values().backward(grad)
        opt.step()
        opt.zero_grad()
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_state_dict_keys_and_torchrec_checkpoint_load() -> None:
    ebc = EmbeddingBagCollection(tables=tables())
    assert list(ebc.state_dict()) == [
        "embedding_bags.t1.weight",
        "embedding_bags.t2.weight",
        "embedding_bags.t3.weight",
    ]
    torchrec_module = TorchRecLike(tables())
    buffer = io.BytesIO()
    torch.save(torchrec_module.state_dict(), buffer)
    buffer.seek(0)
    ebc.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for name in ("t1", "t2", "t3"):
        assert torch.equal(
            ebc.embedding_bags[name].weight, torchrec_module.embedding_bags[name].weight
        )
    # The load went into the fused storage the kernel reads.
    torch.testing.assert_close(ebc(kjt()).values(), torchrec_module(kjt()))


def test_named_parameters_use_torchrec_names() -> None:
    ebc = EmbeddingBagCollection(tables=tables())
    names = [n for n, _ in ebc.named_parameters()]
    assert names == ["embedding_bags.t1.weight", "embedding_bags.t2.weight",
                     "embedding_bags.t3.weight"]  # fmt: skip
    assert ebc.embedding_bags["t2"].weight.shape == (7, 8)


def test_meta_allocates_nothing_and_reset_materialises() -> None:
    configs = tables()
    configs[0] = EmbeddingBagConfig(
        name="t1", num_embeddings=10, embedding_dim=4, feature_names=["f1"],
        init_fn=lambda w: nn.init.constant_(w, 0.25),
    )  # fmt: skip
    ebc = EmbeddingBagCollection(tables=configs, device="meta")
    assert ebc.device.type == "meta"
    assert all(p.is_meta for p in ebc.parameters())
    weight = ebc.embedding_bags["t1"].weight
    ebc.reset_parameters()
    assert ebc.device.type == "cpu"
    assert ebc.embedding_bags["t1"].weight is weight
    assert torch.equal(weight.detach(), torch.full((10, 4), 0.25))
    bound = configs[1].weight_init_max
    assert bound is not None
    assert float(ebc.embedding_bags["t2"].weight.detach().abs().max()) <= bound
    assert ebc(kjt()).values().shape == (4, 24)


def test_to_empty_and_to_keep_parameters_tied_to_storage() -> None:
    ebc = EmbeddingBagCollection(tables=tables(), device="meta")
    ebc.to_empty(device="cpu")
    ebc.reset_parameters()
    ebc.to(torch.device("cpu"))
    with torch.no_grad():
        ebc.embedding_bags["t3"].weight.fill_(1.0)
    only_f3 = KeyedJaggedTensor.from_lengths_sync(
        keys=["f1", "f2", "f3"], values=torch.tensor([4]), lengths=torch.tensor([0, 0, 1])
    )
    assert torch.equal(ebc(only_f3)["f3"], torch.ones(1, 4))


def test_half_precision_tables_output_fp32() -> None:
    configs = [
        EmbeddingBagConfig(name="h", num_embeddings=7, embedding_dim=4, feature_names=["f1"],
                           data_type=DataType.FP16),
        EmbeddingBagConfig(name="b", num_embeddings=6, embedding_dim=4, feature_names=["f3"],
                           data_type=DataType.BF16),
    ]  # fmt: skip
    ebc = EmbeddingBagCollection(tables=configs)
    assert ebc.embedding_bags["h"].weight.dtype == torch.float16
    assert ebc.embedding_bags["b"].weight.dtype == torch.bfloat16
    features = kjt(["f1", "f3"], seed=1)
    out = ebc(features).values()
    assert out.dtype == torch.float32
    ref = TorchRecLike(configs).float()
    ref.load_state_dict({k: v.float() for k, v in ebc.state_dict().items()})
    torch.testing.assert_close(out, ref(features), rtol=1e-2, atol=1e-2)


def test_unknown_key_missing_feature_and_bad_ids_are_named() -> None:
    ebc = EmbeddingBagCollection(tables=tables())
    with pytest.raises(ValueError, match=r"KJT keys \['zz'\] are not read by any table"):
        ebc(
            KeyedJaggedTensor.from_lengths_sync(
                keys=["f1", "f2", "f3", "zz"], values=torch.tensor([1]),
                lengths=torch.tensor([1, 0, 0, 0]),
            )
        )  # fmt: skip
    with pytest.raises(ValueError, match="feature 'f3' of table 't3' is missing"):
        ebc(kjt(["f1", "f2"]))
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["f1", "f2", "f3"], values=torch.tensor([1, 2, 5]), lengths=torch.tensor([1, 1, 1])
    )
    with pytest.raises(ValueError, match=r"id 5 of feature 'f3' .* is out of range for table 't3'"):
        ebc(bad)
    negative = KeyedJaggedTensor.from_lengths_sync(
        keys=["f1", "f2", "f3"], values=torch.tensor([-1, 2, 1]), lengths=torch.tensor([1, 1, 1])
    )
    with pytest.raises(ValueError, match=r"id -1 of feature 'f1' .* table 't1'"):
        ebc(negative)


def test_bad_configurations_are_named() -> None:
    dup = [EmbeddingBagConfig(name="t", num_embeddings=3, embedding_dim=2, feature_names=["a"])] * 2
    with pytest.raises(ValueError, match="duplicate table name 't'"):
        EmbeddingBagCollection(tables=dup)
    none = [EmbeddingBagConfig(name="t", num_embeddings=3, embedding_dim=2, feature_names=["a"],
                               pooling=PoolingType.NONE)]  # fmt: skip
    with pytest.raises(ValueError, match="table 't' has pooling NONE"):
        EmbeddingBagCollection(tables=none)
    wrong = EmbeddingConfig(name="e", num_embeddings=3, embedding_dim=2, feature_names=["a"])
    with pytest.raises(TypeError, match="must be EmbeddingBagConfig"):
        EmbeddingBagCollection(tables=[wrong])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="has no feature_names"):
        EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="t", num_embeddings=3, embedding_dim=2)]
        )
    with pytest.raises(ValueError, match="unsupported fused optimizer"):
        EmbeddingBagCollection(tables=tables(), fused_params={"optimizer": "lamb"})


def test_fbgemm_backend_from_meta_loads_a_torchrec_checkpoint() -> None:
    if not ops.fbgemm_available():
        pytest.skip("fbgemm_gpu is not importable here (absent or hidden by SHARDREC_HIDE_FBGEMM)")
    configs = [
        EmbeddingBagConfig(name="t1", num_embeddings=10, embedding_dim=4, feature_names=["f1"]),
        EmbeddingBagConfig(name="t3", num_embeddings=5, embedding_dim=8, feature_names=["f3"]),
    ]
    ebc = EmbeddingBagCollection(
        tables=configs, device="meta", fused_params={"optimizer": "sgd"}, backend="fbgemm"
    )
    assert all(p.is_meta for p in ebc.parameters())
    ebc.reset_parameters()
    torchrec_module = TorchRecLike(configs)
    ebc.load_state_dict(torchrec_module.state_dict())
    features = kjt(["f1", "f3"], seed=6)
    torch.testing.assert_close(ebc(features).values(), torchrec_module(features))


@pytest.mark.parametrize("fused_params", [None, {"optimizer": "rowwise_adagrad"}])
def test_empty_batch(fused_params: dict[str, object] | None) -> None:
    """A batch of zero samples (a rank that got no data) gives a [0, sum of dims] output."""
    ebc = EmbeddingBagCollection(tables=tables(), fused_params=fused_params)
    before = {k: v.clone() for k, v in ebc.state_dict().items()}
    empty = KeyedJaggedTensor(
        keys=["f1", "f2", "f3"],
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(0, dtype=torch.int32),
        stride=0,
    )
    out = ebc(empty).values()
    assert out.shape == (0, 24)
    out.sum().backward()
    for key, value in ebc.state_dict().items():
        assert torch.equal(value, before[key])
