"""KeyedJaggedTensor: the tutorial's example, hand-checked operations, and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
            {"values": torch.tensor([1, 2]), "lengths": torch.tensor([1.0, 1.0])},
            TypeError,
            "integer",
        ),
        (
            {"values": torch.tensor([1, 2]), "lengths": torch.ones(1, 2, dtype=torch.long)},
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


# -- permute's cached plans and its two copy paths ----------------------------------------------


def _permute_by_position(
    kjt: KeyedJaggedTensor, indices: list[int]
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor | None, list[int]]:
    """The simple path: per-key slices picked one by one and concatenated.

    Returns keys, values, lengths, weights and length_per_key (keys may repeat).
    """
    per_key = kjt.length_per_key()
    values = torch.split(kjt.values(), per_key)
    lengths = kjt.lengths().view(len(kjt.keys()), kjt.stride())
    weights = kjt.weights_or_none()

    def pick(parts: tuple[torch.Tensor, ...] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return torch.cat([parts[i] for i in indices]) if indices else like[:0]

    return (
        [kjt.keys()[i] for i in indices],
        pick(values, kjt.values()),
        pick(lengths, kjt.lengths()),
        None if weights is None else pick(torch.split(weights, per_key), weights),
        [per_key[i] for i in indices],
    )


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(0, 4),
    st.booleans(),
    st.booleans(),
    st.data(),
)
def test_permute_equals_simple_path(
    num_keys: int, batch: int, one_hot: bool, weighted: bool, data: st.DataObject
) -> None:
    # one_hot: every key has `batch` ids (the row-gather path); otherwise random lengths.
    keys = [f"f{i}" for i in range(num_keys)]
    if one_hot:
        lengths = torch.ones(num_keys * batch, dtype=torch.int32)
    else:
        lengths = torch.tensor(
            data.draw(
                st.lists(st.integers(0, 3), min_size=num_keys * batch, max_size=num_keys * batch)
            ),
            dtype=torch.int32,
        )
    total = int(lengths.sum())
    values = torch.arange(total) * 7
    weights = torch.arange(total, dtype=torch.float32) / 2 if weighted else None
    indices = data.draw(st.lists(st.integers(0, num_keys - 1), max_size=2 * num_keys))
    for _ in range(2):  # the second round runs from the cached plan
        kjt = KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)
        got = kjt.permute(indices)
        want_keys, want_values, want_lengths, want_weights, want_per_key = _permute_by_position(
            kjt, indices
        )
        assert got.keys() == want_keys
        assert got.stride() == batch
        assert torch.equal(got.values(), want_values)
        assert torch.equal(got.lengths(), want_lengths)
        assert got.lengths().dtype == torch.int32
        if want_weights is not None:
            assert torch.equal(got.weights(), want_weights)
        else:
            assert got.weights_or_none() is None
        assert got.length_per_key() == want_per_key
        assert got.offset_per_key() == [0, *itertools.accumulate(want_per_key)]
        # A tensor of indices gives the same result.
        via_tensor = kjt.permute(indices, torch.tensor(indices, dtype=torch.int32))
        assert torch.equal(via_tensor.values(), want_values)
        assert torch.equal(via_tensor.lengths(), want_lengths)


def test_permute_cached_plan_still_checks_indices() -> None:
    two = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b"], torch.tensor([1, 2]), torch.tensor([1, 1])
    )
    assert two.permute([1, 0]).values().tolist() == [2, 1]
    assert two.permute([1, 0]).values().tolist() == [2, 1]  # cached
    # 0.0 and True compare and hash like 0 and 1, so they would find the cached plans.
    with pytest.raises(TypeError, match=r"permute index at position 0 is float"):
        two.permute([1.0, 0.0])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"permute index at position 0 is bool"):
        two.permute([True, False])
    # The plan of [1, 0] for two keys is no plan for one key.
    one = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"permute index 1 at position 0 is out of range"):
        one.permute([1, 0])
