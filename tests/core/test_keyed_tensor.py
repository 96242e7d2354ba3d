"""KeyedTensor: the tutorial's pooled output shape, slicing by key, regroup."""

from __future__ import annotations

import torch

from shardrec import KeyedTensor


def pooled() -> KeyedTensor:
    # What an EmbeddingBagCollection returns for a batch of 3: 4 + 2 columns.
    return KeyedTensor(
        keys=["product", "user"],
        length_per_key=[4, 2],
        values=torch.arange(18.0).reshape(3, 6),
    )


def test_accessors() -> None:
    kt = pooled()
    assert kt.keys() == ["product", "user"]
    assert kt.key_dim() == 1
    assert kt.length_per_key() == [4, 2]
    assert kt.offset_per_key() == [0, 4, 6]
    assert kt["user"].tolist() == [[4.0, 5.0], [10.0, 11.0], [16.0, 17.0]]
    as_dict = kt.to_dict()
    assert list(as_dict) == ["product", "user"]
    assert torch.equal(as_dict["product"], kt.values()[:, :4])
    assert kt.to("cpu").device() == torch.device("cpu")
    assert repr(kt).startswith('KeyedTensor(key_dim=1, {\n    "product": tensor(')


def test_from_tensor_list() -> None:
    kt = KeyedTensor.from_tensor_list(["a", "b"], [torch.ones(2, 3), torch.zeros(2, 1)])
    assert kt.length_per_key() == [3, 1]
    assert kt.values().tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]


def test_regroup_across_keyed_tensors() -> None:
    first = pooled()
    second = KeyedTensor(["item"], [1], torch.tensor([[100.0], [200.0], [300.0]]))
    user_item, product = KeyedTensor.regroup([first, second], [["user", "item"], ["product"]])
    assert user_item.tolist() == [[4.0, 5.0, 100.0], [10.0, 11.0, 200.0], [16.0, 17.0, 300.0]]
    assert torch.equal(product, first["product"])
    # Regrouped tensors are new storage, never views of the inputs.
    assert product.data_ptr() != first.values().data_ptr()
    named = KeyedTensor.regroup_as_dict([first, second], [["item"]], ["only_item"])
    assert named["only_item"].tolist() == [[100.0], [200.0], [300.0]]


def test_regroup_backpropagates() -> None:
    values = torch.arange(6.0).reshape(1, 6).requires_grad_()
    kt = KeyedTensor(["product", "user"], [4, 2], values)
    (out,) = KeyedTensor.regroup([kt], [["user", "product"]])
    (out * torch.arange(6.0)).sum().backward()
    assert values.grad is not None
    assert values.grad.tolist() == [[2.0, 3.0, 4.0, 5.0, 0.0, 1.0]]
