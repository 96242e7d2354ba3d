"""JaggedTensor: constructors, dense forms, lengths/offsets, movement, repr."""

from __future__ import annotations

import torch

from shardrec import JaggedTensor


def test_lengths_and_offsets_derive_each_other() -> None:
    from_lengths = JaggedTensor(values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 0, 1]))
    assert from_lengths.offsets().tolist() == [0, 2, 2, 3]
    assert from_lengths.offsets().dtype == torch.int64
    from_offsets = JaggedTensor(
        values=torch.tensor([1, 2, 3]), offsets=torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    )
    assert from_offsets.lengths().tolist() == [2, 0, 1]
    assert from_offsets.lengths().dtype == torch.int32
    assert from_offsets.lengths_or_none() is not None  # kept after the first derivation
    assert JaggedTensor(torch.tensor([1]), lengths=torch.tensor([1])).offsets_or_none() is None


def test_dense_forms() -> None:
    jt = JaggedTensor.from_dense(
        [torch.tensor([1.0, 2.0]), torch.tensor([]), torch.tensor([3.0])],
        weights=[torch.tensor([0.5, 0.25]), torch.tensor([]), torch.tensor([2.0])],
    )
    assert [t.tolist() for t in jt.to_dense()] == [[1.0, 2.0], [], [3.0]]
    weights = jt.to_dense_weights()
    assert weights is not None
    assert [t.tolist() for t in weights] == [[0.5, 0.25], [], [2.0]]
    assert jt.to_padded_dense().tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]
    assert jt.to_padded_dense(desired_length=1, padding_value=-1.0).tolist() == [
        [1.0],
        [-1.0],
        [3.0],
    ]
    padded_weights = jt.to_padded_dense_weights(desired_length=3)
    assert padded_weights is not None
    assert padded_weights.tolist() == [[0.5, 0.25, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]


def test_from_dense_lengths_keeps_embedding_rows() -> None:
    padded = torch.arange(12.0).reshape(2, 3, 2)  # two rows, width 3, an embedding of 2 per id
    jt = JaggedTensor.from_dense_lengths(padded, torch.tensor([1, 3]))
    assert jt.values().shape == (4, 2)
    assert jt.values().tolist() == [[0.0, 1.0], [6.0, 7.0], [8.0, 9.0], [10.0, 11.0]]
    assert jt.to_padded_dense(desired_length=3).tolist() == [
        [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
        [[6.0, 7.0], [8.0, 9.0], [10.0, 11.0]],
    ]


def test_empty_to_and_repr() -> None:
    empty = JaggedTensor.empty(is_weighted=True)
    assert empty.values().numel() == 0
    assert empty.weights().numel() == 0
    assert empty.to_padded_dense().shape == (0, 0)
    jt = JaggedTensor(torch.tensor([4, 5]), lengths=torch.tensor([0, 2]))
    moved = jt.to(torch.device("cpu"))
    assert moved.device() == torch.device("cpu")
    assert torch.equal(moved.values(), jt.values())
    assert repr(jt) == "JaggedTensor([[], [4, 5]])"
    assert jt.weights_or_none() is None
