"""torch.compile (and torch.export) of code that takes a KeyedJaggedTensor gives the eager result.

One small compile with backend="aot_eager" and fullgraph=True (the containers trace without a graph
break): it runs Dynamo's tracing (where the containers' pytree registration and Python-level
methods matter) and AOTAutograd, but skips Inductor's C++ codegen, which takes tens of seconds on
the project's 2 shared cores and tests nothing about the containers.
"""

from __future__ import annotations

import torch

from shardrec import KeyedJaggedTensor, KeyedTensor


def pooled_features(kjt: KeyedJaggedTensor, table: torch.Tensor) -> KeyedTensor:
    """A miniature EmbeddingBagCollection: weighted sum of rows per key and sample."""
    pooled = []
    for key, jt in kjt.to_dict().items():
        rows = table[jt.values()] * jt.weights().unsqueeze(1)
        segment = torch.repeat_interleave(
            torch.arange(kjt.stride()), jt.lengths().long(), output_size=jt.values().numel()
        )
        out = torch.zeros(kjt.stride(), table.shape[1]).index_add_(0, segment, rows)
        pooled.append(out * (2.0 if key == "user" else 1.0))
    return KeyedTensor.from_tensor_list(kjt.keys(), pooled)


def test_compiled_matches_eager() -> None:
    torch._dynamo.reset()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["product", "user"],
        values=torch.tensor([1, 2, 3, 4, 5, 6]),
        lengths=torch.tensor([2, 0, 1, 1, 1, 1]),
        weights=torch.tensor([0.5, 1.0, 2.0, 1.0, 1.0, 3.0]),
    )
    table = torch.randn(10, 4)
    eager = pooled_features(kjt, table)
    compiled = torch.compile(pooled_features, backend="aot_eager", fullgraph=True)(kjt, table)
    assert isinstance(compiled, KeyedTensor)
    assert compiled.keys() == eager.keys()
    assert compiled.length_per_key() == eager.length_per_key()
    torch.testing.assert_close(compiled.values(), eager.values())
    torch.testing.assert_close(compiled["user"], eager["user"])


def test_pytree_flattens_to_tensors() -> None:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a"], values=torch.tensor([7, 8]), lengths=torch.tensor([2])
    )
    leaves, spec = torch.utils._pytree.tree_flatten({"batch": kjt})
    assert [t.tolist() for t in leaves] == [[7, 8], [2]]
    back = torch.utils._pytree.tree_unflatten([leaves[0] + 1, leaves[1]], spec)["batch"]
    assert back.keys() == ["a"]
    assert back.values().tolist() == [8, 9]
    assert back.length_per_key() == [2]


class _PerKeySums(torch.nn.Module):
    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return torch.stack([jt.values().float().sum() for jt in kjt.to_dict().values()])


def test_torch_export_takes_a_kjt() -> None:
    # torch.export flattens inputs with the pytree registration (flatten_with_keys).
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 0, 2])
    )
    exported = torch.export.export(_PerKeySums(), (kjt,))
    other = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([5, 6, 7, 8]), lengths=torch.tensor([1, 1, 0, 2])
    )
    assert exported.module()(other).tolist() == _PerKeySums()(other).tolist() == [11.0, 15.0]
