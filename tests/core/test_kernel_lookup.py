"""TableBatchedEmbedding: forward, gradients and the weights/state contract, on both backends.

The reference is written bag by bag in plain torch (one leaf tensor per table), so every pooled
row, every gradient and every update can be checked independently of the kernel's own tricks.
"""

from __future__ import annotations

import pytest
import torch

from shardrec import KeyedJaggedTensor, ops
from shardrec.kernels import (
    BACKEND_ENV_VAR,
    FeatureSpec,
    FusedOptimizerConfig,
    KernelBackend,
    OptimizerType,
    PoolingType,
    TableBatchedEmbedding,
    TableSpec,
)

from ._kernel_reference import random_kjt, reference_pooled

BACKENDS = ["torch", "fbgemm"]


def need(backend: str) -> None:
    if backend == "fbgemm" and not ops.fbgemm_available():
        pytest.skip("fbgemm_gpu is not importable here (absent or hidden by SHARDREC_HIDE_FBGEMM)")


def build(
    backend: str,
    tables: list[TableSpec],
    features: list[FeatureSpec],
    *,
    optimizer: FusedOptimizerConfig | None = None,
    weighted: bool = False,
    pooled: bool = True,
    seed: int = 0,
) -> TableBatchedEmbedding:
    module = TableBatchedEmbedding(
        tables=tables,
        features=features,
        pooled=pooled,
        is_weighted=weighted,
        optimizer=optimizer,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(seed)
    module.load_table_weights(
        {t.name: torch.rand(t.num_embeddings, t.embedding_dim, generator=gen) - 0.5 for t in tables}
    )
    return module


TABLES = [
    TableSpec(name="a", num_embeddings=11, embedding_dim=8),
    TableSpec(name="b", num_embeddings=7, embedding_dim=4, pooling=PoolingType.MEAN),
    TableSpec(name="c", num_embeddings=5, embedding_dim=8),
]
# Feature f2 shares table a with f0; table b's dim differs, so the torch backend has two groups.
FEATURES = [
    FeatureSpec(name="f0", table="a"),
    FeatureSpec(name="f1", table="b"),
    FeatureSpec(name="f2", table="a"),
    FeatureSpec(name="f3", table="c"),
]
POOLING = {t.name: t.pooling for t in TABLES}
ROWS = {t.name: t.num_embeddings for t in TABLES}


def spec_list() -> list[tuple[str, str, PoolingType]]:
    return [(f.name, f.table, POOLING[f.table]) for f in FEATURES]


def kjt_for(batch: int = 5, seed: int = 0, max_len: int = 3) -> KeyedJaggedTensor:
    return random_kjt(
        [f.name for f in FEATURES], [ROWS[f.table] for f in FEATURES], batch, max_len=max_len,
        seed=seed,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_pooled_forward_matches_reference(backend: str, weighted: bool) -> None:
    need(backend)
    if backend == "fbgemm" and weighted:
        # FBGEMM's CPU kernel gets weighted MEAN's gradient wrong, so it refuses that table.
        tables = [TableSpec(name=t.name, num_embeddings=t.num_embeddings,
                            embedding_dim=t.embedding_dim) for t in TABLES]  # fmt: skip
    else:
        tables = TABLES
    optimizer = FusedOptimizerConfig(optimizer=OptimizerType.SGD, learning_rate=0.1)
    module = build(backend, tables, FEATURES, optimizer=optimizer, weighted=weighted)
    kjt = kjt_for()
    out = module(kjt)
    assert isinstance(out, torch.Tensor)
    features = [(f.name, f.table, next(t.pooling for t in tables if t.name == f.table))
                for f in FEATURES]  # fmt: skip
    expected = reference_pooled(kjt, module.table_weights(), features, weighted)
    assert out.shape == (5, 8 + 4 + 8 + 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key_major", [False, True])
def test_plain_mode_gradients_match_reference(key_major: bool) -> None:
    """Both layouts of multi-id bags (sample-major, CPU's default; key-major, CUDA's)."""
    module = build("torch", TABLES, FEATURES, weighted=True)
    for group in module._groups:
        group.key_major = key_major  # type: ignore[attr-defined]
    kjt = kjt_for(batch=6, seed=3)
    ref = {n: w.clone().requires_grad_(True) for n, w in module.table_weights().items()}
    out = module(kjt)
    expected = reference_pooled(kjt, ref, spec_list(), True)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for name, param in module.weights.items():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, ref[name].grad, rtol=1e-5, atol=1e-6)


def test_every_bag_empty_gives_zeros_and_no_update() -> None:
    optimizer = FusedOptimizerConfig(optimizer=OptimizerType.SGD, learning_rate=1.0)
    module = build("torch", TABLES, FEATURES, optimizer=optimizer)
    before = {n: w.clone() for n, w in module.table_weights().items()}
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in FEATURES],
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(4 * 3, dtype=torch.int64),
    )
    out = module(kjt)
    assert torch.equal(out, torch.zeros(3, 28))
    out.sum().backward()
    for name, weight in module.table_weights().items():
        assert torch.equal(weight, before[name])


def test_sequence_mode_returns_rows_per_feature() -> None:
    backend = "torch"  # FBGEMM's CPU sequence lookup is refused (see ops.py)
    tables = [
        TableSpec(name="a", num_embeddings=9, embedding_dim=4, pooling=PoolingType.NONE),
        TableSpec(name="b", num_embeddings=6, embedding_dim=4, pooling=PoolingType.NONE),
    ]
    features = [FeatureSpec(name="x", table="a"), FeatureSpec(name="y", table="b"),
                FeatureSpec(name="z", table="a")]  # fmt: skip
    optimizer = FusedOptimizerConfig(optimizer=OptimizerType.SGD, learning_rate=0.5)
    module = build(backend, tables, features, optimizer=optimizer, pooled=False)
    kjt = random_kjt(["x", "y", "z"], [9, 6, 9], 4, seed=5)
    weights = {n: w.clone() for n, w in module.table_weights().items()}
    out = module(kjt)
    assert isinstance(out, list)
    for rows, f in zip(out, features, strict=True):
        torch.testing.assert_close(rows, weights[f.table][kjt[f.name].values()])
    # SGD with a gradient of ones: each id's row moves by -lr per occurrence.
    sum(r.sum() for r in out).backward()  # type: ignore[union-attr]
    for f in features:
        ids = kjt[f.name].values()
        counts = torch.bincount(ids, minlength=weights[f.table].shape[0]).float()
        weights[f.table] -= 0.5 * counts.unsqueeze(1)
    for name, w in module.table_weights().items():
        torch.testing.assert_close(w, weights[name])


def test_sequence_mode_mixed_dims_and_dim_one() -> None:
    tables = [
        TableSpec(name="a", num_embeddings=9, embedding_dim=1, pooling=PoolingType.NONE),
        TableSpec(name="b", num_embeddings=6, embedding_dim=3, pooling=PoolingType.NONE),
    ]
    features = [FeatureSpec(name="x", table="a"), FeatureSpec(name="y", table="b")]
    module = build("torch", tables, features, pooled=False)
    kjt = random_kjt(["x", "y"], [9, 6], 4, seed=2)
    out = module(kjt)
    assert isinstance(out, list)
    assert [tuple(o.shape) for o in out] == [
        (kjt["x"].values().numel(), 1),
        (kjt["y"].values().numel(), 3),
    ]
    sum(o.sum() for o in out).backward()  # type: ignore[union-attr]
    grad_a = module.weights["a"].grad
    assert grad_a is not None
    expected = torch.bincount(kjt["x"].values(), minlength=9).float().unsqueeze(1)
    torch.testing.assert_close(grad_a, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [11, -1])
def test_out_of_range_id_names_feature_and_table(backend: str, bad: int) -> None:
    need(backend)
    optimizer = FusedOptimizerConfig(optimizer=OptimizerType.SGD)
    tables = [TableSpec(name="a", num_embeddings=11, embedding_dim=4)]
    features = [FeatureSpec(name="f0", table="a"), FeatureSpec(name="f2", table="a")]
    module = build(backend, tables, features, optimizer=optimizer)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f2"], values=torch.tensor([1, 2, bad]), lengths=torch.tensor([1, 1, 1, 0])
    )
    with pytest.raises(ValueError, match=f"id {bad} of feature 'f2' .* table 'a'"):
        module(kjt)


def test_kjt_keys_must_match_features() -> None:
    module = build("torch", TABLES, FEATURES)
    kjt = random_kjt(["f0", "f2", "f1", "f3"], [11, 11, 7, 5], 2)
    with pytest.raises(ValueError, match="do not match this lookup's features"):
        module(kjt)


@pytest.mark.parametrize(
    ("tables", "features", "message"),
    [
        ([TableSpec(name="a", num_embeddings=2, embedding_dim=2)] * 2, [], "duplicate table"),
        (
            [TableSpec(name="a", num_embeddings=2, embedding_dim=2)],
            [FeatureSpec(name="f", table="zz")],
            "feature 'f' reads unknown table 'zz'",
        ),
        (
            [TableSpec(name="a", num_embeddings=2, embedding_dim=2, pooling=PoolingType.NONE)],
            [FeatureSpec(name="f", table="a")],
            "pooling NONE in a pooled lookup",
        ),
    ],
)
def test_bad_construction_is_named(
    tables: list[TableSpec], features: list[FeatureSpec], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TableBatchedEmbedding(tables=tables, features=features, backend="torch")


def test_table_spec_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="embedding_dim of table 't'"):
        TableSpec(name="t", num_embeddings=3, embedding_dim=0)


def test_weights_are_views_and_load_copies_in_place() -> None:
    module = build("torch", TABLES, FEATURES)
    views = module.table_weights()
    new = torch.arange(7 * 4, dtype=torch.float32).view(7, 4)
    module.load_table_weights({"b": new})
    assert torch.equal(views["b"], new)
    assert torch.equal(module.weights["b"].detach(), new)
    with pytest.raises(ValueError, match="table 'b' has shape"):
        module.load_table_weights({"b": torch.zeros(3, 4)})
    with pytest.raises(KeyError, match="no table named 'q'"):
        module.load_table_weights({"q": torch.zeros(3, 4)})


def test_optimizer_states_are_named_views() -> None:
    optimizer = FusedOptimizerConfig(optimizer=OptimizerType.ADAM)
    module = build("torch", TABLES, FEATURES, optimizer=optimizer)
    states = module.optimizer_states()
    assert set(states) == {"a", "b", "c"}
    assert set(states["b"]) == {"exp_avg", "exp_avg_sq", "step"}
    assert states["b"]["step"].shape == ()
    assert states["b"]["exp_avg"].shape == (7, 4)
    module.load_optimizer_states({"b": {"exp_avg": torch.ones(7, 4)}})
    assert torch.equal(module.optimizer_states()["b"]["exp_avg"], torch.ones(7, 4))
    with pytest.raises(KeyError, match="no optimizer state 'sum'"):
        module.load_optimizer_states({"b": {"sum": torch.ones(7)}})


def test_meta_device_allocates_nothing_until_reset() -> None:
    module = TableBatchedEmbedding(tables=TABLES, features=FEATURES, device="meta", backend="torch")
    assert module.device.type == "meta"
    assert all(p.is_meta for p in module.parameters())
    # A lookup on meta tables gives the output's shape, with no data (shape propagation).
    out = module(kjt_for())
    assert isinstance(out, torch.Tensor)
    assert out.is_meta
    assert out.shape == (5, 28)
    params = dict(module.weights.items())
    module.reset_parameters()
    assert module.device.type == "cpu"
    # Same Parameter objects, now real and inside the bounds of the default init.
    for name, p in module.weights.items():
        assert p is params[name]
        assert not p.is_meta
        assert float(p.detach().abs().max()) <= (1 / p.shape[0]) ** 0.5
    assert module(kjt_for()).shape == (5, 28)  # type: ignore[union-attr]


def test_to_empty_then_reset_materialises() -> None:
    module = TableBatchedEmbedding(tables=TABLES, features=FEATURES, device="meta", backend="torch")
    module.to_empty(device="cpu")
    module.reset_parameters(init_fns={"a": torch.nn.init.ones_})
    assert torch.equal(module.table_weights()["a"], torch.ones(11, 8))


def test_backend_argument_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    optimizer = FusedOptimizerConfig(optimizer=OptimizerType.SGD)
    module = TableBatchedEmbedding(tables=TABLES, features=FEATURES, optimizer=optimizer)
    assert module.backend is KernelBackend.TORCH
    monkeypatch.setenv(BACKEND_ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match="SHARDREC_KERNEL_BACKEND must be one of"):
        TableBatchedEmbedding(tables=TABLES, features=FEATURES)


def test_auto_picks_torch_when_fbgemm_cannot_run_it() -> None:
    # Plain mode (.grad) is not offered by FBGEMM's CPU kernel, and dims must be multiples of 4.
    plain = TableBatchedEmbedding(tables=TABLES, features=FEATURES, backend="auto")
    assert plain.backend is KernelBackend.TORCH
    odd = [TableSpec(name="a", num_embeddings=3, embedding_dim=3)]
    fused = TableBatchedEmbedding(
        tables=odd,
        features=[FeatureSpec(name="f", table="a")],
        optimizer=FusedOptimizerConfig(optimizer=OptimizerType.SGD),
        backend="auto",
    )
    assert fused.backend is KernelBackend.TORCH


def test_auto_picks_fbgemm_when_it_can() -> None:
    need("fbgemm")
    module = TableBatchedEmbedding(
        tables=TABLES,
        features=FEATURES,
        optimizer=FusedOptimizerConfig(optimizer=OptimizerType.SGD),
        backend="auto",
    )
    assert module.backend is KernelBackend.FBGEMM


def test_explicit_fbgemm_explains_why_it_cannot() -> None:
    need("fbgemm")
    with pytest.raises(ValueError, match="no fused Adam"):
        TableBatchedEmbedding(
            tables=TABLES,
            features=FEATURES,
            optimizer=FusedOptimizerConfig(optimizer=OptimizerType.ADAM),
            backend="fbgemm",
        )
    with pytest.raises(ValueError, match="sequence"):
        TableBatchedEmbedding(
            tables=[TableSpec(name="a", num_embeddings=4, embedding_dim=4)],
            features=[FeatureSpec(name="f", table="a")],
            pooled=False,
            optimizer=FusedOptimizerConfig(optimizer=OptimizerType.SGD),
            backend="fbgemm",
        )
    with pytest.raises(ValueError, match="no BF16 weights"):
        TableBatchedEmbedding(
            tables=[TableSpec(name="a", num_embeddings=4, embedding_dim=4, data_type="BF16")],
            features=[FeatureSpec(name="f", table="a")],
            optimizer=FusedOptimizerConfig(optimizer=OptimizerType.SGD),
            backend="fbgemm",
        )
    with pytest.raises(ValueError, match="weighted MEAN"):
        TableBatchedEmbedding(
            tables=TABLES,
            features=FEATURES,
            is_weighted=True,
            optimizer=FusedOptimizerConfig(optimizer=OptimizerType.SGD),
            backend="fbgemm",
        )
