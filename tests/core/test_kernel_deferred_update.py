"""A lookup with ``deferred_update=True`` fills ``.grad`` in backward and applies its fused
optimizer later, from the gradients and rows it is given: the same step as fused mode."""

from __future__ import annotations

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.kernels import (
    FeatureSpec,
    FusedOptimizerConfig,
    KernelBackend,
    OptimizerType,
    TableBatchedEmbedding,
    TableSpec,
)

TABLES = [TableSpec(name="t", num_embeddings=6, embedding_dim=4)]
TABLES += [TableSpec(name="u", num_embeddings=3, embedding_dim=8)]  # another dim: another group
FEATURES = [FeatureSpec(name="f", table="t"), FeatureSpec(name="g", table="u")]


def lookup(optimizer: OptimizerType, deferred: bool) -> TableBatchedEmbedding:
    tbe = TableBatchedEmbedding(
        tables=TABLES,
        features=FEATURES,
        optimizer=FusedOptimizerConfig(optimizer=optimizer, learning_rate=0.1),
        backend=KernelBackend.TORCH,
        deferred_update=deferred,
    )
    torch.manual_seed(0)
    tbe.reset_parameters()
    return tbe


def batch(step: int) -> KeyedJaggedTensor:
    # f: ids 1, 2, 2 (+ step); g: id 0 at step 0 only: later steps touch nothing of u.
    ids = [1 + step % 3, 2, 2] + ([0] if step == 0 else [])
    lengths = [2, 1] + ([1, 0] if step == 0 else [0, 0])
    return KeyedJaggedTensor(
        keys=["f", "g"], values=torch.tensor(ids), lengths=torch.tensor(lengths)
    )


@pytest.mark.parametrize("optimizer", list(OptimizerType))
def test_deferred_update_equals_the_fused_step(optimizer: OptimizerType) -> None:
    fused, deferred = lookup(optimizer, False), lookup(optimizer, True)
    assert not any(p.requires_grad for p in deferred.weights.values())  # no outside optimizer
    seen: list[dict[str, list[int]]] = []

    def update(tbe: TableBatchedEmbedding) -> None:
        # Runs inside backward, once, after both groups (dims 4 and 8) left their gradients.
        touched = {n: m.nonzero().squeeze(1) for n, m in tbe.take_touched_rows().items()}
        seen.append({n: rows.tolist() for n, rows in touched.items()})
        tbe.apply_update(tbe.take_gradients(), touched)

    deferred.register_update_hook(update)
    for step in range(3):
        kjt = batch(step)
        fused(kjt).square().sum().backward()
        deferred(kjt).square().sum().backward()
        assert len(seen) == step + 1
        assert seen[-1]["t"] == sorted(set(kjt["f"].values().tolist()))
        assert seen[-1]["u"] == sorted(set(kjt["g"].values().tolist()))
    for name in ("t", "u"):
        torch.testing.assert_close(
            deferred.table_weights()[name], fused.table_weights()[name], atol=1e-6, rtol=1e-6
        )
        for key, value in fused.optimizer_states()[name].items():
            torch.testing.assert_close(deferred.optimizer_states()[name][key], value)


def test_rows_left_out_keep_their_weights_and_state() -> None:
    tbe = lookup(OptimizerType.ADAM, True)
    before = tbe.table_weights()["t"].clone()
    grad = torch.ones(6, 4)
    tbe.apply_update({"t": grad}, {"t": torch.tensor([4])})
    after = tbe.table_weights()["t"]
    assert not torch.equal(after[4], before[4])
    torch.testing.assert_close(after[[0, 1, 2, 3, 5]], before[[0, 1, 2, 3, 5]], atol=0, rtol=0)
    assert int(tbe.optimizer_states()["t"]["step"]) == 1
    assert float(tbe.optimizer_states()["t"]["exp_avg"][0].abs().sum()) == 0.0


def test_deferred_update_errors_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="needs a fused optimizer"):
        TableBatchedEmbedding(tables=TABLES, features=FEATURES, deferred_update=True)
    with pytest.raises(ValueError, match="backend='fbgemm'"):
        TableBatchedEmbedding(
            tables=TABLES,
            features=FEATURES,
            optimizer=FusedOptimizerConfig(optimizer=OptimizerType.SGD, learning_rate=0.1),
            backend="fbgemm",
            deferred_update=True,
        )
    with pytest.raises(ValueError, match="deferred_update=True"):
        lookup(OptimizerType.SGD, False).apply_update({}, {})
    tbe = lookup(OptimizerType.SGD, True)
    with pytest.raises(KeyError, match="'nope'"):
        tbe.apply_update({}, {"nope": torch.tensor([0])})
    with pytest.raises(ValueError, match="table 't' needs a gradient of shape"):
        tbe.apply_update({"t": torch.zeros(2, 4)}, {"t": torch.tensor([0])})
    with pytest.raises(ValueError, match="register_update_hook"):
        lookup(OptimizerType.SGD, False).register_update_hook(lambda _: None)
