"""The torch backend on CUDA gives the CPU's numbers: outputs, gradients, fused updates.

Runs only where CUDA is available (the GPU machines have torch without FBGEMM).
"""

from __future__ import annotations

import pytest
import torch

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)
from shardrec.kernels import (
    FeatureSpec,
    FusedOptimizerConfig,
    OptimizerType,
    TableBatchedEmbedding,
    TableSpec,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TABLES = [
    TableSpec(name="a", num_embeddings=50, embedding_dim=8),
    TableSpec(name="b", num_embeddings=20, embedding_dim=3, pooling=PoolingType.MEAN),
]
FEATURES = [FeatureSpec(name="x", table="a"), FeatureSpec(name="y", table="b"),
            FeatureSpec(name="z", table="a")]  # fmt: skip
ROWS = [50, 20, 50]


def kjt(seed: int, batch: int = 16) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (3 * batch,), generator=gen)
    values = [
        torch.randint(0, n, (int(lengths[i * batch : (i + 1) * batch].sum()),), generator=gen)
        for i, n in enumerate(ROWS)
    ]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["x", "y", "z"],
        values=torch.cat(values),
        lengths=lengths,
        weights=torch.rand(int(lengths.sum()), generator=gen),
    )


@pytest.mark.parametrize("kind", [None, *OptimizerType])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_matches_cpu(kind: OptimizerType | None, weighted: bool) -> None:
    config = None if kind is None else FusedOptimizerConfig(optimizer=kind, learning_rate=0.05)
    modules = {
        dev: TableBatchedEmbedding(
            tables=TABLES, features=FEATURES, is_weighted=weighted, optimizer=config,
            backend="torch", device=dev,
        )
        for dev in ("cpu", "cuda")
    }  # fmt: skip
    init = {t.name: torch.randn(t.num_embeddings, t.embedding_dim) for t in TABLES}
    for m in modules.values():
        m.load_table_weights(init)
    for step in range(3):
        features = kjt(step)
        grad = torch.randn(16, 8 + 3 + 8)
        out_cpu = modules["cpu"](features)
        out_gpu = modules["cuda"](features.to("cuda"))
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)  # type: ignore[union-attr]
        out_cpu.backward(grad)  # type: ignore[union-attr]
        out_gpu.backward(grad.cuda())  # type: ignore[union-attr]
    for name in ("a", "b"):
        torch.testing.assert_close(
            modules["cuda"].table_weights()[name].cpu(), modules["cpu"].table_weights()[name],
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        if kind is None:
            g_gpu, g_cpu = modules["cuda"].weights[name].grad, modules["cpu"].weights[name].grad
            assert g_gpu is not None
            assert g_cpu is not None
            torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-5, atol=1e-5)


def test_collections_on_cuda_from_meta() -> None:
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4,
                                   feature_names=["x", "y", "z"])],
        device="meta",
    )  # fmt: skip
    ebc.to_empty(device="cuda")
    ebc.reset_parameters()
    assert ebc.embedding_bags["t"].weight.is_cuda
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["x", "y", "z"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1])
    ).to("cuda")
    out = ebc(features).values()
    weight = ebc.embedding_bags["t"].weight.detach()
    torch.testing.assert_close(out, weight[torch.tensor([1, 2, 3], device="cuda")].view(1, 12))
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name="e", num_embeddings=10, embedding_dim=3, feature_names=["x"])],
        device="cuda",
    )
    good = KeyedJaggedTensor.from_lengths_sync(
        keys=["x"], values=torch.tensor([4, 5]), lengths=torch.tensor([2])
    ).to("cuda")
    assert ec(good)["x"].values().is_cuda
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["x"], values=torch.tensor([10]), lengths=torch.tensor([1])
    ).to("cuda")
    with pytest.raises(ValueError, match="id 10 of feature 'x'"):
        ec(bad)


if __name__ == "__main__":
    # For GPU machines without pytest: run every case directly.
    for case_kind in [None, *OptimizerType]:
        for case_weighted in (False, True):
            test_cuda_matches_cpu(case_kind, case_weighted)
            print(f"ok cuda == cpu: optimizer={case_kind} weighted={case_weighted}")
    test_collections_on_cuda_from_meta()
    print("ok collections on cuda from meta")
