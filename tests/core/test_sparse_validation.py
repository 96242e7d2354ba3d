"""Bad input to the containers gets a ValueError/TypeError that names the key and position.

Constructor checks read only metadata (no device sync); ``validate()`` reads contents. The
containers refuse only what no container can hold: what the values are (ids, floats, rows) is
for the consumer to check, as in TorchRec.
"""

from __future__ import annotations

import pytest
import torch

from shardrec import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from shardrec.sparse import IndexDtypeError

KEYS = ["product", "user"]
IDS = torch.tensor([101, 202, 303, 404, 505, 606])
LENGTHS = torch.tensor([2, 0, 1, 1, 1, 1])


def test_values_of_any_dtype_and_shape_are_accepted() -> None:
    # The embedding lookup checks for integer ids; the container holds whatever it is given.
    floats = KeyedJaggedTensor(KEYS, IDS.float(), lengths=LENGTHS)
    assert floats["product"].values().tolist() == [101.0, 202.0, 303.0]
    rows = KeyedJaggedTensor(KEYS, IDS.view(6, 1).expand(6, 3), lengths=LENGTHS)
    assert rows["user"].values().shape == (3, 3)
    assert rows.validate() is rows


def test_scalar_values() -> None:
    with pytest.raises(ValueError, match=r"values must have at least one dimension"):
        KeyedJaggedTensor(KEYS, torch.tensor(3), lengths=LENGTHS)


def test_lengths_not_a_multiple_of_keys() -> None:
    with pytest.raises(ValueError, match=r"5 lengths is not a multiple of the 2 keys"):
        KeyedJaggedTensor(KEYS, IDS[:5], lengths=LENGTHS[:5])


def test_stride_disagrees_with_lengths() -> None:
    with pytest.raises(ValueError, match=r"stride=4 but 6 lengths for 2 keys"):
        KeyedJaggedTensor(KEYS, IDS, lengths=LENGTHS, stride=4)


def test_float_lengths() -> None:
    with pytest.raises(IndexDtypeError, match=r"lengths must be of integer type, got dtype"):
        KeyedJaggedTensor(KEYS, IDS, lengths=LENGTHS.float())
    with pytest.raises(IndexDtypeError, match=r"offsets must be of integer type"):
        JaggedTensor(IDS, offsets=torch.tensor([0.0, 6.0]))
    # The error is a TypeError, and the AssertionError TorchRec raises for the same input.
    assert issubclass(IndexDtypeError, TypeError)
    assert issubclass(IndexDtypeError, AssertionError)


def test_empty_lengths_of_any_dtype_are_accepted() -> None:
    kjt = KeyedJaggedTensor(KEYS, torch.tensor([]), lengths=torch.tensor([]))
    assert kjt.stride() == 0
    assert kjt.to_dict()["user"].lengths().numel() == 0


def test_negative_length_names_key_and_sample() -> None:
    kjt = KeyedJaggedTensor(KEYS, IDS, lengths=torch.tensor([2, 0, 1, 1, -1, 3]))
    with pytest.raises(ValueError, match=r"negative length -1 for key 'user' at sample 1"):
        kjt.validate()


def test_lengths_do_not_sum_to_values() -> None:
    kjt = KeyedJaggedTensor(KEYS, IDS[:5], lengths=LENGTHS)
    with pytest.raises(ValueError, match=r"lengths sum to 6 but values has 5 entries"):
        kjt.validate()
    with pytest.raises(ValueError, match=r"sums to 6 but values has 5 entries"):
        kjt.sync()  # the free part of the check also runs where the sizes are computed


def test_length_per_key_disagrees_with_lengths_names_key() -> None:
    kjt = KeyedJaggedTensor(KEYS, IDS, lengths=LENGTHS, length_per_key=[2, 4])
    with pytest.raises(ValueError, match=r"key 'product' has 3 ids by its lengths"):
        kjt.validate()


def test_bad_offsets() -> None:
    kjt = KeyedJaggedTensor(KEYS, IDS, offsets=torch.tensor([0, 2, 1, 3, 4, 5, 6]))
    with pytest.raises(
        ValueError, match=r"offsets decrease at position 2 \(2 -> 1\), key 'product' at sample 1"
    ):
        kjt.validate()
    short = KeyedJaggedTensor(KEYS, IDS, offsets=torch.tensor([0, 2, 2, 3, 4, 5, 5]))
    with pytest.raises(ValueError, match=r"sum to 5 but values has 6 entries; 1 values follow"):
        short.validate()
    long = KeyedJaggedTensor(KEYS, IDS[:4], offsets=torch.tensor([0, 2, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match=r"key 'user' runs past the end of values"):
        long.validate()
    shifted = KeyedJaggedTensor(KEYS, IDS, offsets=torch.tensor([1, 2, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match=r"offsets\[0\] is 1, expected 0"):
        shifted.validate()


def test_weights_of_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"weights has 5 entries but values has 6"):
        KeyedJaggedTensor(KEYS, IDS, lengths=LENGTHS, weights=torch.ones(5))
    with pytest.raises(ValueError, match=r"weights has 2 entries but values has 3"):
        JaggedTensor(torch.ones(3, 4), lengths=torch.tensor([3]), weights=torch.ones(2, 4))


def test_weights_of_any_dtype_are_accepted() -> None:
    # Integer weights are how an EmbeddingCollection with need_indices returns ids.
    kjt = KeyedJaggedTensor(KEYS, IDS, lengths=LENGTHS, weights=IDS * 2)
    assert kjt["user"].weights().tolist() == [808, 1010, 1212]
    jt = JaggedTensor(values=torch.ones(3, 4), weights=IDS[:3], lengths=torch.tensor([2, 1]))
    assert torch.equal(jt.weights(), IDS[:3])


def test_neither_lengths_nor_offsets() -> None:
    # Accepted, as in TorchRec; only asking for what is not there fails, and says why.
    kjt = KeyedJaggedTensor(KEYS, torch.empty(0))
    assert kjt.stride() == 0
    assert str(kjt) == "KeyedJaggedTensor()\n"
    with pytest.raises(ValueError, match=r"has neither lengths nor offsets"):
        kjt.lengths()
    with pytest.raises(ValueError, match=r"has neither lengths nor offsets"):
        kjt.validate()


def test_duplicate_keys_named_with_positions() -> None:
    with pytest.raises(ValueError, match=r"duplicate key 'user' at positions 0 and 2"):
        KeyedJaggedTensor(["user", "product", "user"], IDS, lengths=torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"duplicate key 'a' at positions 0 and 1"):
        KeyedTensor(["a", "a"], [1, 1], torch.zeros(2, 2))


def test_non_string_key() -> None:
    with pytest.raises(TypeError, match=r"key at position 1 is int 7, expected str"):
        KeyedTensor(["a", 7], [1, 1], torch.zeros(2, 2))  # type: ignore[list-item]


def test_validate_checks_key_types_and_devices() -> None:
    kjt = KeyedJaggedTensor(["a", 3], IDS, lengths=LENGTHS)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"key at position 1 is int 3, expected str"):
        kjt.validate()
    split_devices = KeyedJaggedTensor(KEYS, IDS, lengths=LENGTHS.to("meta"))
    with pytest.raises(ValueError, match=r"lengths is on meta but values on cpu"):
        split_devices.validate()


def test_permute_index_out_of_range() -> None:
    kjt = KeyedJaggedTensor(KEYS, IDS, lengths=LENGTHS)
    with pytest.raises(
        ValueError, match=r"permute index 2 at position 1 is out of range for 2 keys"
    ):
        kjt.permute([0, 2])
    with pytest.raises(ValueError, match=r"permute index -1 at position 0"):
        kjt.permute([-1])
    with pytest.raises(TypeError, match=r"permute index at position 0 is float"):
        kjt.permute([0.0])  # type: ignore[list-item]


def test_split_segments_out_of_range() -> None:
    kjt = KeyedJaggedTensor(KEYS, IDS, lengths=LENGTHS)
    with pytest.raises(ValueError, match=r"segments \[1, 2\] cover 3 keys but there are 2"):
        kjt.split([1, 2])
    with pytest.raises(ValueError, match=r"split segment -1 at position 0 is negative"):
        kjt.split([-1, 3])


def test_concat_mismatches() -> None:
    a = KeyedJaggedTensor(["a"], IDS[:3], lengths=torch.tensor([1, 1, 1]))
    b = KeyedJaggedTensor(["b"], IDS[:2], lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"position 1 has stride 2, expected 3"):
        KeyedJaggedTensor.concat([a, b])
    with pytest.raises(ValueError, match=r"duplicate key 'a' at positions 0 and 1"):
        KeyedJaggedTensor.concat([a, a])
    w = KeyedJaggedTensor(["c"], IDS[:3], lengths=torch.tensor([1, 1, 1]), weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"position 1 is weighted"):
        KeyedJaggedTensor.concat([a, w])


def test_from_jt_dict_rows_of_different_counts_give_a_variable_batch() -> None:
    # TorchRec's meaning: keys with their own numbers of rows make a variable-batch KJT.
    jts = {
        "a": JaggedTensor(IDS[:3], lengths=torch.tensor([1, 1, 1])),
        "b": JaggedTensor(IDS[:2], lengths=torch.tensor([1, 1])),
    }
    kjt = KeyedJaggedTensor.from_jt_dict(jts)
    assert kjt.variable_stride_per_key()
    assert kjt.stride_per_key_per_rank() == [[3], [2]]
    assert kjt["b"].values().tolist() == IDS[:2].tolist()


def test_missing_key_lookup() -> None:
    kjt = KeyedJaggedTensor(KEYS, IDS, lengths=LENGTHS)
    with pytest.raises(KeyError, match=r"no key 'item'"):
        kjt["item"]
    kt = KeyedTensor(["a"], [2], torch.zeros(3, 2))
    with pytest.raises(KeyError, match=r"no key 'b'"):
        kt["b"]


def test_keyed_tensor_sizes() -> None:
    with pytest.raises(ValueError, match=r"length_per_key sums to 3 but values has 4 entries"):
        KeyedTensor(["a", "b"], [1, 2], torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"length_per_key has 1 entries for 2 keys"):
        KeyedTensor(["a", "b"], [4], torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"length for key 'b' is -1"):
        KeyedTensor(["a", "b"], [5, -1], torch.zeros(2, 4))


def test_regroup_bad_input() -> None:
    kt = KeyedTensor(["a", "b"], [1, 2], torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"key 'z' of group 1 is in none of the KeyedTensors"):
        KeyedTensor.regroup([kt], [["a"], ["z"]])
    other = KeyedTensor(["c"], [1], torch.zeros(5, 1))
    with pytest.raises(ValueError, match=r"position 1 has values of shape \(5, 1\)"):
        KeyedTensor.regroup([kt, other], [["a", "c"]])


def test_jagged_tensor_checks() -> None:
    with pytest.raises(ValueError, match=r"give lengths= or offsets="):
        JaggedTensor(IDS)
    with pytest.raises(ValueError, match=r"weights has 2 entries but values has 6"):
        JaggedTensor(IDS, lengths=LENGTHS, weights=torch.ones(2))
    bad = JaggedTensor(IDS, lengths=torch.tensor([3, -1, 4]))
    with pytest.raises(ValueError, match=r"lengths\[1\] = -1 is negative"):
        bad.validate()
    with pytest.raises(ValueError, match=r"lengths sum to 5 but values has 6"):
        JaggedTensor(IDS, lengths=torch.tensor([2, 3])).validate()


def test_constructor_does_not_read_contents() -> None:
    # The constructor checks only metadata, so it accepts tensors on the meta device (which have
    # no contents at all): a stand-in for "never waits on an accelerator".
    values = torch.empty(6, dtype=torch.long, device="meta")
    lengths = torch.empty(6, dtype=torch.long, device="meta")
    kjt = KeyedJaggedTensor(KEYS, values, lengths=lengths)
    assert kjt.stride() == 3
    assert kjt.device().type == "meta"
