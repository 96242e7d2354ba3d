"""Which kernel ``backend="auto"`` picks, per fused optimizer and device, and that the pick changes
nothing but speed: a module on the picked backend trains like one on the other, and each loads the
other's weights and optimizer states.
"""

from __future__ import annotations

import pytest
import torch

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, ops
from shardrec.kernels import (
    BACKEND_ENV_VAR,
    FeatureSpec,
    FusedOptimizerConfig,
    KernelBackend,
    OptimizerType,
    TableBatchedEmbedding,
    TableSpec,
)
from shardrec.kernels.storage_groups import TORCH_FASTER_ON_CPU, resolve_default_backend

TABLES = [
    TableSpec(name="a", num_embeddings=30, embedding_dim=8),
    TableSpec(name="b", num_embeddings=7, embedding_dim=4),
]
FEATURES = [FeatureSpec(name="f0", table="a"), FeatureSpec(name="f1", table="b")]
needs_fbgemm = pytest.mark.skipif(not ops.fbgemm_available(), reason="needs fbgemm_gpu")


def resolve(kind: OptimizerType, device: str, requested: str = "auto") -> KernelBackend:
    return resolve_default_backend(
        KernelBackend(requested),
        TABLES,
        True,
        False,
        FusedOptimizerConfig(optimizer=kind),
        torch.device(device),
    )


def test_exact_adagrad_is_the_only_rule_preferring_torch_on_cpu() -> None:
    # Adam needs no entry: FBGEMM's CPU kernel has none, so auto falls back to torch anyway.
    assert frozenset({OptimizerType.EXACT_ADAGRAD}) == TORCH_FASTER_ON_CPU


@needs_fbgemm
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (OptimizerType.EXACT_ADAGRAD, KernelBackend.TORCH),
        (OptimizerType.ADAM, KernelBackend.TORCH),
        (OptimizerType.ROWWISE_ADAGRAD, KernelBackend.FBGEMM),
        (OptimizerType.SGD, KernelBackend.FBGEMM),
    ],
)
def test_auto_on_cpu_picks_the_faster_kernel_per_rule(
    device: str, kind: OptimizerType, expected: KernelBackend
) -> None:
    assert resolve(kind, device) is expected


@needs_fbgemm
@pytest.mark.parametrize("kind", list(OptimizerType))
def test_auto_on_cuda_keeps_fbgemm_for_every_rule(kind: OptimizerType) -> None:
    # Asked without building anything, so no GPU is needed: the resolution is a pure function.
    assert resolve(kind, "cuda") is KernelBackend.FBGEMM


@needs_fbgemm
def test_an_explicit_fbgemm_still_gets_fbgemm_for_exact_adagrad(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert resolve(OptimizerType.EXACT_ADAGRAD, "cpu", "fbgemm") is KernelBackend.FBGEMM
    monkeypatch.setenv(BACKEND_ENV_VAR, "fbgemm")
    module = TableBatchedEmbedding(
        tables=TABLES,
        features=FEATURES,
        optimizer=FusedOptimizerConfig(optimizer=OptimizerType.EXACT_ADAGRAD),
    )
    assert module.backend is KernelBackend.FBGEMM
    assert module.group_backends == ("fbgemm",)


def _ebc(backend: str) -> EmbeddingBagCollection:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=30, feature_names=["f0"]),
        EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=7, feature_names=["f1"]),
    ]
    return EmbeddingBagCollection(
        tables=tables,
        fused_params={"optimizer": "adagrad", "learning_rate": 0.1, "eps": 1e-8},
        backend=backend,
    )


def _batch(seed: int) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (2 * 4,), generator=gen)
    counts = lengths.view(2, 4).sum(1).tolist()
    values = torch.cat(
        [
            torch.randint(0, 30, (counts[0],), generator=gen),
            torch.randint(0, 7, (counts[1],), generator=gen),
        ]
    )
    return KeyedJaggedTensor(keys=["f0", "f1"], values=values, lengths=lengths)


def _train(ebc: EmbeddingBagCollection, steps: range) -> torch.Tensor:
    out = torch.zeros(0)
    for step in steps:
        out = ebc(_batch(step)).values()
        out.pow(2).sum().backward()
    return out.detach()


@needs_fbgemm
def test_auto_exact_adagrad_trains_like_fbgemm_and_swaps_checkpoints_with_it() -> None:
    auto, fbgemm = _ebc("auto"), _ebc("fbgemm")
    assert set(auto.lookup.group_backends) == {"torch"}
    assert set(fbgemm.lookup.group_backends) == {"fbgemm"}
    torch.testing.assert_close(_train(auto, range(3)), _train(fbgemm, range(3)))
    # A checkpoint written under the old default (FBGEMM) resumes under the new one, and back.
    resumed_auto, resumed_fbgemm = _ebc("auto"), _ebc("fbgemm")
    resumed_auto.load_state_dict(fbgemm.state_dict())
    resumed_auto.lookup.load_optimizer_states(fbgemm.lookup.optimizer_states())
    resumed_fbgemm.load_state_dict(auto.state_dict())
    resumed_fbgemm.lookup.load_optimizer_states(auto.lookup.optimizer_states())
    steps = range(3, 5)
    expected = _train(fbgemm, steps)
    torch.testing.assert_close(_train(resumed_auto, steps), expected)
    torch.testing.assert_close(_train(resumed_fbgemm, steps), expected)
    for name, states in auto.lookup.optimizer_states().items():
        assert states.keys() == fbgemm.lookup.optimizer_states()[name].keys()
