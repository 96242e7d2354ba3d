"""``copy.deepcopy`` and pickling of the embedding modules and the fused kernel give a copy that
trains and checkpoints its own tables: a step on the copy moves the copy's state_dict and not the
original's, and the other way round (their parameters are views of their own fused storage)."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    ops,
)
from shardrec.kernels import FeatureSpec, TableBatchedEmbedding, TableSpec

FEATURES = KeyedJaggedTensor(
    keys=["f1", "f2"], values=torch.tensor([1, 2, 3, 0, 4]), lengths=torch.tensor([2, 1, 1, 1])
)
SGD: dict[str, Any] = {"optimizer": "sgd", "learning_rate": 0.5}


def ebc(fused: dict[str, Any] | None, backend: str = "torch") -> nn.Module:
    tables = [
        EmbeddingBagConfig(name="t1", num_embeddings=6, embedding_dim=4, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", num_embeddings=5, embedding_dim=8, feature_names=["f2"]),
    ]
    return EmbeddingBagCollection(tables=tables, fused_params=fused, backend=backend)


def ec(fused: dict[str, Any] | None, backend: str = "torch") -> nn.Module:
    tables = [
        EmbeddingConfig(name="t1", num_embeddings=6, embedding_dim=4, feature_names=["f1"]),
        EmbeddingConfig(name="t2", num_embeddings=5, embedding_dim=4, feature_names=["f2"]),
    ]
    return EmbeddingCollection(tables=tables, fused_params=fused, backend=backend)


def tbe(fused: dict[str, Any] | None, backend: str = "torch") -> nn.Module:
    from shardrec.kernels import FusedOptimizerConfig

    lookup = TableBatchedEmbedding(
        tables=[
            TableSpec(name="t1", num_embeddings=6, embedding_dim=4),
            TableSpec(name="t2", num_embeddings=5, embedding_dim=4),
        ],
        features=[FeatureSpec(name="f1", table="t1"), FeatureSpec(name="f2", table="t2")],
        optimizer=None if fused is None else FusedOptimizerConfig.from_fused_params(fused),
        backend=backend,
    )
    lookup.reset_parameters()  # a bare lookup's tables are uninitialised until then
    return lookup


def output_sum(module: nn.Module) -> torch.Tensor:
    out = module(FEATURES)
    if isinstance(out, dict):
        return sum((jt.values().sum() for jt in out.values()), torch.zeros(()))
    if isinstance(out, list):
        return sum((t.sum() for t in out), torch.zeros(()))
    if isinstance(out, torch.Tensor):
        return out.sum()
    return out.values().sum()


def step(module: nn.Module, fused: bool) -> None:
    """One training step: fused (the update runs in backward) or plain SGD on ``.grad``."""
    loss = output_sum(module)
    loss.backward()
    if not fused:
        with torch.no_grad():
            for p in module.parameters():
                assert p.grad is not None
                p -= 0.5 * p.grad
                p.grad = None


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def torch_save_load(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded: nn.Module = torch.load(buffer, weights_only=False)
    return loaded


COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": torch_save_load,
}
BUILDERS = {"ebc": ebc, "ec": ec, "tbe": tbe}
CASES = [
    (kind, fused, backend)
    for kind in BUILDERS
    for fused, backend in [(None, "torch"), (SGD, "torch"), (SGD, "fbgemm")]
    if not (kind == "ec" and backend == "fbgemm")  # FBGEMM's CPU sequence lookup is not used
]


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize(("kind", "fused", "backend"), CASES)
def test_a_copy_trains_and_checkpoints_its_own_tables(
    how: str, kind: str, fused: dict[str, Any] | None, backend: str
) -> None:
    if backend == "fbgemm" and not ops.fbgemm_available():
        pytest.skip("fbgemm_gpu is not importable here")
    torch.manual_seed(0)
    original = BUILDERS[kind](fused, backend)
    clone = COPIES[how](original)
    torch.testing.assert_close(output_sum(clone), output_sum(original))
    for trained, other in [(clone, original), (original, clone)]:
        trained_before, other_before = snapshot(trained), snapshot(other)
        out_before = output_sum(trained).detach()
        step(trained, fused is not None)
        assert changed(trained_before, trained), "a step must move the trained module's tables"
        assert not changed(other_before, other), "a step must not move the other module's tables"
        # What the lookups read is what the state dict shows.
        assert not torch.equal(output_sum(trained).detach(), out_before)


def test_a_copy_loads_a_state_dict_into_what_its_lookups_read() -> None:
    torch.manual_seed(0)
    original = ebc(SGD)
    clone = copy.deepcopy(original)
    zeros = {k: torch.zeros_like(v) for k, v in original.state_dict().items()}
    clone.load_state_dict(zeros)
    assert float(output_sum(clone).detach().abs()) == 0.0
    assert float(output_sum(original).detach().abs()) > 0.0
