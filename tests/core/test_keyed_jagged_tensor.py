"""KeyedJaggedTensor: the tutorial's example, hand-checked operations, and bad input."""

from __future__ import annotations

import pytest
import torch

from shardrec import JaggedTensor, KeyedJaggedTensor


def tutorial_kjt() -> KeyedJaggedTensor:
    # The TorchRec introduction's example: two features over a batch of three.
    return KeyedJaggedTensor(
        keys=["product", "user"],
        values=torch.tensor([101, 202, 303, 404, 505, 606]),
        lengths=torch.tensor([2, 0, 1, 1, 1, 1], dtype=torch.int64),
    )


def rows(jt: JaggedTensor) -> list[list[int]]:
    return [t.tolist() for t in jt.to_dense()]


def test_tutorial_example() -> None:
    kjt = tutorial_kjt()
    assert kjt.keys() == ["product", "user"]
    assert kjt.stride() == 3
    assert kjt.length_per_key() == [3, 3]
    assert kjt.offset_per_key() == [0, 3, 6]
    assert kjt.offsets().tolist() == [0, 2, 2, 3, 4, 5, 6]
    assert rows(kjt["product"]) == [[101, 202], [], [303]]
    assert rows(kjt["user"]) == [[404], [505], [606]]
    assert kjt.weights_or_none() is None
    assert repr(kjt) == (
        "KeyedJaggedTensor({\n"
        '    "product": [[101, 202], [], [303]],\n'
        '    "user": [[404], [505], [606]]\n'
        "})"
    )


def test_from_offsets_sync_matches_lengths() -> None:
    kjt = KeyedJaggedTensor.from_offsets_sync(
        keys=["product", "user"],
        values=torch.tensor([101, 202, 303, 404, 505, 606]),
        offsets=torch.tensor([0, 2, 2, 3, 4, 5, 6]),
    )
    assert kjt.length_per_key_or_none() == [3, 3]
    assert kjt.lengths().tolist() == [2, 0, 1, 1, 1, 1]
    assert {k: rows(v) for k, v in kjt.to_dict().items()} == {
        "product": [[101, 202], [], [303]],
        "user": [[404], [505], [606]],
    }


def test_permute_with_repeats_and_weights() -> None:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3, 4]),
        lengths=torch.tensor([1, 1, 0, 2]),
        weights=torch.tensor([0.1, 0.2, 0.3, 0.4]),
    )
    out = kjt.permute([1, 0, 1])
    assert out.keys() == ["b", "a", "b"]
    assert out.values().tolist() == [3, 4, 1, 2, 3, 4]
    assert out.lengths().tolist() == [0, 2, 1, 1, 0, 2]
    assert out.weights().tolist() == pytest.approx([0.3, 0.4, 0.1, 0.2, 0.3, 0.4])
    assert out.length_per_key() == [2, 2, 2]
    assert out.offset_per_key() == [0, 2, 4, 6]


def test_split_with_empty_segments_and_concat_back() -> None:
    kjt = tutorial_kjt()
    parts = kjt.split([0, 1, 0, 1])
    assert [p.keys() for p in parts] == [[], ["product"], [], ["user"]]
    assert all(p.stride() == 3 for p in parts)
    assert parts[0].values().numel() == 0
    assert parts[3].values().tolist() == [404, 505, 606]
    joined = KeyedJaggedTensor.concat(parts)
    assert joined.keys() == kjt.keys()
    assert torch.equal(joined.values(), kjt.values())
    assert torch.equal(joined.lengths(), kjt.lengths())


def test_from_jt_dict_round_trip() -> None:
    kjt = tutorial_kjt()
    again = KeyedJaggedTensor.from_jt_dict(kjt.to_dict())
    assert again.keys() == kjt.keys()
    assert torch.equal(again.values(), kjt.values())
    assert torch.equal(again.lengths(), kjt.lengths())
    assert again.length_per_key_or_none() == [3, 3]


def test_empty_and_to() -> None:
    empty = KeyedJaggedTensor.empty(is_weighted=True)
    assert empty.keys() == []
    assert empty.values().numel() == 0
    assert empty.weights().numel() == 0
    moved = tutorial_kjt().to("cpu")
    assert moved.device() == torch.device("cpu")
    assert rows(moved["product"]) == [[101, 202], [], [303]]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"values": torch.tensor([1.0, 2.0]), "lengths": torch.tensor([1, 1])},
            TypeError,
            "integer",
        ),
        (
            {"values": torch.ones(2, 2, dtype=torch.long), "lengths": torch.tensor([1, 1])},
            ValueError,
            "1-D",
        ),
        (
            {"values": torch.tensor([1, 2, 3]), "lengths": torch.tensor([1, 1, 1])},
            ValueError,
            "multiple",
        ),
        (
            {
                "values": torch.tensor([1, 2]),
                "lengths": torch.tensor([1, 1]),
                "weights": torch.ones(3),
            },
            ValueError,
            "weights has 3",
        ),
    ],
)
def test_constructor_rejects(
    kwargs: dict[str, torch.Tensor], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        KeyedJaggedTensor(keys=["a", "b"], **kwargs)
