"""Changing the fused optimizers' learning rate: ``TableBatchedEmbedding.set_learning_rate`` and
``shardrec.kernels.set_learning_rate`` over a whole module.

A step after ``set_learning_rate(lr)`` must equal a step of a lookup built with ``learning_rate=lr``
holding the same weights and optimizer states.
"""

from __future__ import annotations

import math

import pytest
import torch

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, ops
from shardrec.kernels import (
    FeatureSpec,
    FusedOptimizerConfig,
    OptimizerType,
    TableBatchedEmbedding,
    TableSpec,
    fused_learning_rates,
    set_learning_rate,
)

TABLES = [
    TableSpec(name="t0", num_embeddings=30, embedding_dim=8),
    TableSpec(name="t1", num_embeddings=50, embedding_dim=4),
]
FEATURES = [FeatureSpec(name="f0", table="t0"), FeatureSpec(name="f1", table="t1")]
OLD_LR, NEW_LR = 0.2, 0.03

CASES = [
    (backend, kind)
    for backend in ("torch", "fbgemm")
    for kind in OptimizerType
    if not (backend == "fbgemm" and kind is OptimizerType.ADAM)
]


def _skip_without_fbgemm(backend: str) -> None:
    if backend == "fbgemm" and not ops.fbgemm_available():
        pytest.skip("fbgemm_gpu is not importable here (absent or hidden by SHARDREC_HIDE_FBGEMM)")


def _kjt(seed: int, batch: int = 6) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (2 * batch,), generator=gen)
    values = torch.cat(
        [
            torch.randint(0, n, (int(lengths[f * batch : (f + 1) * batch].sum()),), generator=gen)
            for f, n in enumerate((30, 50))
        ]
    )
    return KeyedJaggedTensor.from_lengths_sync(keys=["f0", "f1"], values=values, lengths=lengths)


def _tbe(backend: str, kind: OptimizerType, lr: float) -> TableBatchedEmbedding:
    tbe = TableBatchedEmbedding(
        tables=TABLES,
        features=FEATURES,
        optimizer=FusedOptimizerConfig(optimizer=kind, learning_rate=lr),
        backend=backend,
    )
    assert tbe.backend.value == backend
    tbe.reset_parameters()  # the storage starts uninitialised
    return tbe


def _step(tbe: TableBatchedEmbedding, seed: int) -> None:
    out = tbe(_kjt(seed))
    assert isinstance(out, torch.Tensor)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + seed))
    (out * grad).sum().backward()


def _copy_into(dst: TableBatchedEmbedding, src: TableBatchedEmbedding) -> None:
    dst.load_table_weights({k: v.clone() for k, v in src.table_weights().items()})
    dst.load_optimizer_states(
        {t: {n: v.clone() for n, v in s.items()} for t, s in src.optimizer_states().items()}
    )


def _assert_same(a: TableBatchedEmbedding, b: TableBatchedEmbedding) -> None:
    for name, w in a.table_weights().items():
        torch.testing.assert_close(w, b.table_weights()[name])
    for name, states in a.optimizer_states().items():
        for key, s in states.items():
            torch.testing.assert_close(s, b.optimizer_states()[name][key], msg=f"{key} of {name}")


@pytest.mark.parametrize(("backend", "kind"), CASES)
def test_set_before_training_equals_a_module_built_with_that_lr(
    backend: str, kind: OptimizerType
) -> None:
    _skip_without_fbgemm(backend)
    changed = _tbe(backend, kind, OLD_LR)
    fresh = _tbe(backend, kind, NEW_LR)
    _copy_into(fresh, changed)
    assert changed.learning_rate == pytest.approx(OLD_LR)
    changed.set_learning_rate(NEW_LR)
    assert changed.learning_rate == pytest.approx(NEW_LR)
    assert changed.optimizer is not None
    assert changed.optimizer.learning_rate == NEW_LR
    for seed in (1, 2):  # Adam's bias correction counts the same steps on both
        _step(changed, seed)
        _step(fresh, seed)
    _assert_same(changed, fresh)


@pytest.mark.parametrize(("backend", "kind"), [c for c in CASES if c[1] is not OptimizerType.ADAM])
def test_set_mid_training_keeps_states_and_uses_the_new_lr(
    backend: str, kind: OptimizerType
) -> None:
    _skip_without_fbgemm(backend)
    changed = _tbe(backend, kind, OLD_LR)
    kept = _tbe(backend, kind, OLD_LR)
    _copy_into(kept, changed)
    _step(changed, 1)
    _step(kept, 1)
    # A fresh module with the new rate, holding the weights and states after step one.
    fresh = _tbe(backend, kind, NEW_LR)
    _copy_into(fresh, changed)
    changed.set_learning_rate(NEW_LR)
    for tbe in (changed, kept, fresh):
        _step(tbe, 2)
    _assert_same(changed, fresh)
    # ... and the change mattered: the module that kept the old rate ended elsewhere.
    differs = any(
        not torch.allclose(w, kept.table_weights()[n]) for n, w in changed.table_weights().items()
    )
    assert differs


@pytest.mark.parametrize("backend", ["torch", "fbgemm"])
def test_rate_survives_a_device_move(backend: str) -> None:
    _skip_without_fbgemm(backend)
    tbe = TableBatchedEmbedding(
        tables=TABLES,
        features=FEATURES,
        optimizer=FusedOptimizerConfig(optimizer=OptimizerType.SGD, learning_rate=OLD_LR),
        backend=backend,
        device="meta",
    )
    tbe.set_learning_rate(NEW_LR)
    tbe.reset_parameters()
    assert tbe.learning_rate == pytest.approx(NEW_LR)


def test_bad_rates_and_plain_mode_are_refused() -> None:
    tbe = _tbe("torch", OptimizerType.SGD, OLD_LR)
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="learning_rate"):
            tbe.set_learning_rate(bad)
    with pytest.raises(TypeError, match="must be a number"):
        tbe.set_learning_rate("0.1")  # type: ignore[arg-type]
    assert tbe.learning_rate == OLD_LR
    plain = TableBatchedEmbedding(tables=TABLES, features=FEATURES, optimizer=None)
    with pytest.raises(ValueError, match="no fused optimizer"):
        plain.set_learning_rate(0.1)
    with pytest.raises(ValueError, match="no fused optimizer"):
        _ = plain.learning_rate


def _ebc(fused: bool) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="a", num_embeddings=30, embedding_dim=8, feature_names=["f0"]),
            EmbeddingBagConfig(name="b", num_embeddings=50, embedding_dim=4, feature_names=["f1"]),
        ],
        fused_params={"optimizer": "rowwise_adagrad", "learning_rate": OLD_LR} if fused else None,
    )


def test_module_walk_sets_every_fused_lookup_of_a_collection() -> None:
    model = torch.nn.ModuleDict({"fused": _ebc(True), "plain": _ebc(False)})
    before = fused_learning_rates(model)
    assert len(before) >= 1
    assert all(lr == pytest.approx(OLD_LR) for lr in before.values())
    assert set_learning_rate(model, NEW_LR) == len(before)
    after = fused_learning_rates(model)
    assert set(after) == set(before)
    assert all(name.startswith("fused.") for name in after)
    assert all(lr == pytest.approx(NEW_LR) for lr in after.values())
    assert set_learning_rate(torch.nn.Linear(2, 2), NEW_LR) == 0
