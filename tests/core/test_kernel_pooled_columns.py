"""The torch backend's two ways to pool key-major bags on CPU give the same bits.

Above ``PER_FEATURE_MIN_BYTES`` per feature block, each feature's bags are pooled by their own
call straight into the output's columns; below it, one call pools every bag and the pooled rows
are transposed. Both must give the same output, and the same weights and state after fused steps
(backward reads the output gradient the same way), for every kind of bag: empty ones, weighted,
MEAN, fp16 tables and groups that hold a subset of the features.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.kernels import (
    DataType,
    FeatureSpec,
    FusedOptimizerConfig,
    OptimizerType,
    PoolingType,
    TableBatchedEmbedding,
    TableSpec,
    torch_backend,
)

from ._kernel_reference import random_kjt, reference_pooled

NEVER = 1 << 62


def tables(data_type: DataType) -> list[TableSpec]:
    # Table b's dim differs: two groups, each with a subset of the features.
    return [
        TableSpec(name="a", num_embeddings=30, embedding_dim=8, data_type=data_type),
        TableSpec(name="b", num_embeddings=9, embedding_dim=4, pooling=PoolingType.MEAN),
        TableSpec(name="c", num_embeddings=17, embedding_dim=8, pooling=PoolingType.MEAN),
    ]


FEATURES = [
    FeatureSpec(name="f0", table="a"),
    FeatureSpec(name="f1", table="b"),
    FeatureSpec(name="f2", table="a"),
    FeatureSpec(name="f3", table="c"),
    FeatureSpec(name="f4", table="c"),
]


def build(data_type: DataType, weighted: bool, optimizer: OptimizerType) -> TableBatchedEmbedding:
    specs = tables(data_type)
    module = TableBatchedEmbedding(
        tables=specs,
        features=FEATURES,
        is_weighted=weighted,
        optimizer=FusedOptimizerConfig(optimizer=optimizer, learning_rate=0.05),
        backend="torch",
    )
    gen = torch.Generator().manual_seed(0)
    module.load_table_weights(
        {t.name: torch.rand(t.num_embeddings, t.embedding_dim, generator=gen) - 0.5 for t in specs}
    )
    return module


def batches(data_type: DataType) -> Iterator[tuple[int, KeyedJaggedTensor]]:
    rows = {t.name: t.num_embeddings for t in tables(data_type)}
    keys = [f.name for f in FEATURES]
    for step, batch in enumerate((6, 1, 6)):
        kjt = random_kjt(keys, [rows[f.table] for f in FEATURES], batch, seed=step, max_len=4)
        yield step, kjt


@pytest.mark.parametrize("data_type", [DataType.FP32, DataType.FP16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("optimizer", [OptimizerType.EXACT_ADAGRAD, OptimizerType.SGD])
def test_per_feature_pooling_is_bit_identical_to_one_call(
    monkeypatch: pytest.MonkeyPatch, data_type: DataType, weighted: bool, optimizer: OptimizerType
) -> None:
    calls = {"n": 0}
    real = torch_backend._pool_into_columns

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch_backend, "_pool_into_columns", counted)
    one_call = build(data_type, weighted, optimizer)
    per_feature = build(data_type, weighted, optimizer)
    specs = [(f.name, f.table, next(t.pooling for t in tables(data_type) if t.name == f.table))
             for f in FEATURES]  # fmt: skip
    groups = len(per_feature._groups)  # 2 (by dim), 3 when table a is fp16
    for step, kjt in batches(data_type):
        monkeypatch.setattr(torch_backend, "PER_FEATURE_MIN_BYTES", NEVER)
        expected = one_call(kjt)
        assert calls["n"] == groups * step, "the one-call path does not pool per feature"
        monkeypatch.setattr(torch_backend, "PER_FEATURE_MIN_BYTES", 0)
        got = per_feature(kjt)
        assert calls["n"] == groups * (step + 1), "every group pools per feature"
        assert isinstance(got, torch.Tensor)
        assert isinstance(expected, torch.Tensor)
        assert torch.equal(got, expected), f"step {step}"
        reference = reference_pooled(kjt, per_feature.table_weights(), specs, weighted)
        torch.testing.assert_close(got, reference, rtol=2e-3, atol=2e-3)
        grad = torch.randn_like(got)
        got.backward(grad)
        expected.backward(grad)
    for name, weight in per_feature.table_weights().items():
        assert torch.equal(weight, one_call.table_weights()[name]), name
    for name, states in per_feature.optimizer_states().items():
        for key, state in states.items():
            assert torch.equal(state, one_call.optimizer_states()[name][key]), (name, key)


def test_empty_feature_gives_zero_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_backend, "PER_FEATURE_MIN_BYTES", 0)
    module = build(DataType.FP32, False, OptimizerType.SGD)
    kjt = random_kjt([f.name for f in FEATURES], [30, 9, 30, 17, 17], 4, seed=5)
    lengths = kjt.lengths().clone()
    lengths[8:12] = 0  # feature f2: no ids at all
    keep = torch.ones(kjt.values().numel(), dtype=torch.bool)
    offsets = kjt.offsets()
    keep[int(offsets[8]) : int(offsets[12])] = False
    empty_f2 = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=kjt.values()[keep], lengths=lengths, weights=kjt.weights()[keep]
    )
    out = module(empty_f2)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out[:, 12:20], torch.zeros(4, 8))  # f0 (8), f1 (4), then f2's 8 columns
    assert out[:, :12].abs().sum() > 0


def test_threshold_picks_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default threshold: per feature at MLPerf-like blocks, one call for small ones."""
    weight = torch.zeros(10, 128)
    assert torch_backend._pools_per_feature(weight, 1024)
    assert not torch_backend._pools_per_feature(weight, 16)
    assert not torch_backend._pools_per_feature(torch.zeros(10, 128, device="meta"), 1024)
