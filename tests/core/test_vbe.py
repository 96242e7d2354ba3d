"""Variable batch per key: construction, checks and every KJT operation, hand-checked.

The running example: two keys, ``user`` with 2 samples and ``item`` with 4, and inverse indices
that expand them to a batch of 4 (samples 0-1 are user 0's items, 2-3 user 1's)::

    user   [7, 8]  [9]
    item   [1]     [2]    [3]    [4, 5]
"""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

from shardrec import JaggedTensor, KeyedJaggedTensor
from shardrec.sparse import (
    IndexDtypeError,
    deduplicate_features,
    expand_features,
    kjt_is_equal,
    variable_batch,
)

KEYS = ["user", "item"]
INVERSE = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 3]])


def vbe_kjt(weighted: bool = False, inverse: bool = True) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        KEYS,
        torch.tensor([7, 8, 9, 1, 2, 3, 4, 5]),
        weights=torch.arange(8.0) if weighted else None,
        lengths=torch.tensor([2, 1, 1, 1, 1, 2], dtype=torch.int32),
        stride_per_key_per_rank=[[2], [4]],
        inverse_indices=(KEYS, INVERSE) if inverse else None,
    )


def full_kjt(weighted: bool = False) -> KeyedJaggedTensor:
    """What vbe_kjt() stands for, every key with 4 samples (weighted: user 1's two samples
    differ in their weight)."""
    weights = torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0, 9.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    return KeyedJaggedTensor(
        KEYS,
        torch.tensor([7, 8, 7, 8, 9, 9, 1, 2, 3, 4, 5]),
        weights=weights if weighted else None,
        lengths=torch.tensor([2, 2, 1, 1, 1, 1, 1, 2], dtype=torch.int32),
    )


def rows(jt: JaggedTensor) -> list[list[int]]:
    return [t.tolist() for t in jt.to_dense()]


def test_construction_and_accessors() -> None:
    kjt = vbe_kjt()
    assert kjt.variable_stride_per_key()
    assert kjt.stride_per_key_per_rank() == [[2], [4]]
    assert kjt.stride_per_key() == [2, 4]
    assert kjt.stride() == 4  # the inverse indices' width
    assert kjt.lengths_offset_per_key() == [0, 2, 6]
    assert kjt.length_per_key() == [3, 5]
    assert kjt.inverse_indices()[0] == KEYS
    assert rows(kjt["user"]) == [[7, 8], [9]]
    assert rows(kjt["item"]) == [[1], [2], [3], [4, 5]]
    kjt.validate()
    # Without inverse indices the batch size is the largest key's; a tensor of strides works too.
    by_tensor = KeyedJaggedTensor(
        KEYS,
        kjt.values(),
        offsets=kjt.offsets(),
        stride_per_key_per_rank=torch.tensor([[1, 1], [3, 1]]),
    )
    assert by_tensor.stride() == 4
    assert by_tensor.stride_per_key() == [2, 4]
    assert by_tensor.length_per_key() == [3, 5]
    uniform = KeyedJaggedTensor(KEYS, kjt.values(), lengths=torch.ones(8, dtype=torch.int32))
    assert not uniform.variable_stride_per_key()
    assert uniform.stride_per_key_per_rank() == []
    assert uniform.inverse_indices_or_none() is None


def test_sync_from_offsets_matches_lengths() -> None:
    by_lengths = vbe_kjt().sync()
    by_offsets = KeyedJaggedTensor.from_offsets_sync(
        KEYS, by_lengths.values(), by_lengths.offsets(), stride_per_key_per_rank=[[2], [4]]
    )
    assert by_offsets.length_per_key() == by_lengths.length_per_key() == [3, 5]
    assert torch.equal(by_offsets.lengths(), by_lengths.lengths().long())


def test_bad_construction_is_named() -> None:
    values, lengths = torch.arange(8), torch.ones(6, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"6 lengths but stride_per_key_per_rank gives 5"):
        KeyedJaggedTensor(KEYS, values, lengths=lengths, stride_per_key_per_rank=[[2], [3]])
    # TorchRec takes strides for fewer keys when the inverse indices give the batch size; a
    # key's stride is then refused where it is needed.
    short = KeyedJaggedTensor(
        KEYS,
        values,
        lengths=lengths,
        stride_per_key_per_rank=[[6]],
        inverse_indices=(KEYS[:1], torch.zeros(1, 3, dtype=torch.long)),
    )
    assert short.stride() == 3
    for use in (short.stride_per_key, short.sync, short.validate, lambda: short["item"]):
        with pytest.raises(ValueError, match=r"1 rows for 2 keys"):
            use()
    with pytest.raises(ValueError, match=r"different numbers of ranks"):
        KeyedJaggedTensor(KEYS, values, lengths=lengths, stride_per_key_per_rank=[[2], [2, 2]])
    with pytest.raises(ValueError, match=r"stride_per_key_per_rank\[1\]\[0\] is -4"):
        KeyedJaggedTensor(KEYS, values, lengths=lengths, stride_per_key_per_rank=[[10], [-4]])
    with pytest.raises(IndexDtypeError, match=r"integer type"):
        KeyedJaggedTensor(
            KEYS, values, lengths=lengths, stride_per_key_per_rank=torch.tensor([[2.0], [4.0]])
        )
    with pytest.raises(ValueError, match=r"inverse_indices has 1 rows for 2 keys"):
        KeyedJaggedTensor(
            KEYS,
            values,
            lengths=lengths,
            stride_per_key_per_rank=[[2], [4]],
            inverse_indices=(KEYS, INVERSE[:1]),
        )
    with pytest.raises(TypeError, match=r"\(keys, tensor\) pair"):
        KeyedJaggedTensor(
            KEYS,
            values,
            lengths=lengths,
            stride_per_key_per_rank=[[2], [4]],
            inverse_indices=INVERSE,  # type: ignore[arg-type]
        )


def test_validate_names_the_bad_inverse_index_and_length() -> None:
    kjt = KeyedJaggedTensor(
        KEYS,
        torch.arange(8),
        lengths=torch.tensor([2, 1, 1, 1, 1, 2]),
        stride_per_key_per_rank=[[2], [4]],
        inverse_indices=(KEYS, torch.tensor([[0, 0, 2, 1], [0, 1, 2, 3]])),
    )
    with pytest.raises(ValueError, match=r"inverse index 2 of key 'user' at sample 2"):
        kjt.validate()
    negative = KeyedJaggedTensor(
        KEYS,
        torch.arange(8),
        lengths=torch.tensor([2, 1, 1, 4, -1, 1]),
        stride_per_key_per_rank=[[2], [4]],
    )
    with pytest.raises(ValueError, match=r"negative length -1 for key 'item' at sample 2"):
        negative.validate()


def test_to_dict_and_from_jt_dict_round_trip() -> None:
    kjt = vbe_kjt(weighted=True)
    jts = kjt.to_dict()
    assert rows(jts["user"]) == [[7, 8], [9]]
    assert jts["item"].weights().tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    again = KeyedJaggedTensor.from_jt_dict(jts)
    assert again.stride_per_key_per_rank() == [[2], [4]]
    assert torch.equal(again.values(), kjt.values())
    assert again.length_per_key() == [3, 5]


def test_permute_moves_lengths_strides_and_inverse_rows() -> None:
    kjt = vbe_kjt(weighted=True)
    permuted = kjt.permute([1, 0, 1])
    assert permuted.keys() == ["item", "user", "item"]
    assert permuted.stride_per_key_per_rank() == [[4], [2], [4]]
    assert permuted.stride() == 4
    assert permuted.lengths().tolist() == [1, 1, 1, 2, 2, 1, 1, 1, 1, 2]
    assert permuted.values().tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 1, 2, 3, 4, 5]
    assert permuted.weights().tolist()[:5] == [3.0, 4.0, 5.0, 6.0, 7.0]
    names, table = permuted.inverse_indices()
    assert names == ["item", "user"]
    assert table.tolist() == [[0, 1, 2, 3], [0, 0, 1, 1]]
    assert rows(permuted.permute([1])["user"]) == [[7, 8], [9]]


def test_split_and_concat_round_trip() -> None:
    kjt = vbe_kjt(weighted=True)
    user, item = kjt.split([1, 1])
    assert user.stride_per_key_per_rank() == [[2]]
    assert user.stride() == item.stride() == 4
    assert user.lengths().tolist() == [2, 1]
    assert item.values().tolist() == [1, 2, 3, 4, 5]
    assert user.inverse_indices()[1].tolist() == [[0, 0, 1, 1]]
    empty, whole = kjt.split([0, 2])
    assert empty.keys() == []
    assert empty.inverse_indices_or_none() is None
    assert kjt_is_equal(whole, kjt)
    assert kjt_is_equal(KeyedJaggedTensor.concat([user, item]), kjt)
    assert kjt_is_equal(KeyedJaggedTensor.concat([item, user]), kjt.permute([1, 0]))


def test_concat_refuses_what_does_not_fit() -> None:
    user, _ = vbe_kjt().split([1, 1])
    plain = KeyedJaggedTensor(["x"], torch.arange(4), lengths=torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"position 1 lacks a variable batch per key"):
        KeyedJaggedTensor.concat([user, plain])
    no_inverse = vbe_kjt(inverse=False).split([1, 1])[1]
    with pytest.raises(ValueError, match=r"inverse_indices unlike the first"):
        KeyedJaggedTensor.concat([user, no_inverse])
    two_ranks = KeyedJaggedTensor(
        ["x"],
        torch.arange(2),
        lengths=torch.ones(2, dtype=torch.int32),
        stride_per_key_per_rank=[[1, 1]],
    )
    with pytest.raises(ValueError, match=r"different numbers of ranks \[1, 2\]"):
        KeyedJaggedTensor.concat([vbe_kjt(inverse=False), two_ranks])


def test_pytree_round_trip_keeps_strides_and_inverse_indices() -> None:
    kjt = vbe_kjt(weighted=True).sync()
    leaves, spec = pytree.tree_flatten(kjt)
    assert any(leaf is INVERSE for leaf in leaves)
    back = pytree.tree_unflatten(leaves, spec)
    assert kjt_is_equal(back, kjt)
    assert back.stride_per_key_per_rank() == [[2], [4]]
    assert back.inverse_indices()[0] == KEYS
    assert back.length_per_key() == [3, 5]
    with pytest.raises(ValueError, match=r"has length 8 but the spec"):
        pytree.tree_unflatten(leaves + leaves, spec)


def test_str_movement_copy_and_clear() -> None:
    kjt = vbe_kjt()
    assert str(kjt) == (
        'KeyedJaggedTensor({\n    "user": [[7, 8], [9]],\n    "item": [[1], [2], [3], [4, 5]]\n})\n'
    )
    moved = kjt.to("cpu", dtype=torch.float64)
    assert moved.stride_per_key_per_rank() == [[2], [4]]
    assert moved.inverse_indices()[1] is INVERSE  # already on cpu: to() returns the same tensor
    buffer = KeyedJaggedTensor.empty_like(kjt.sync(), device="cpu")
    assert kjt_is_equal(buffer.copy_(kjt), kjt)
    with pytest.raises(ValueError, match=r"copy_: the source has keys"):
        buffer.copy_(full_kjt())
    assert kjt.clear_storage() > 0
    assert kjt.stride_per_key() == [0, 0]
    assert kjt.stride() == 0
    assert kjt.to_dict()["item"].lengths().numel() == 0
    kjt.validate()


def test_deduplicate_and_expand() -> None:
    full = full_kjt()
    dedup = deduplicate_features(full, ["user"])
    assert dedup.stride_per_key_per_rank() == [[2], [4]]
    assert dedup.stride() == 4
    assert rows(dedup["user"]) == [[7, 8], [9]]
    assert dedup.inverse_indices()[1].tolist() == INVERSE.tolist()
    assert kjt_is_equal(dedup, vbe_kjt())
    assert kjt_is_equal(expand_features(dedup), full)
    dedup.validate()
    # Every key by default; samples equal in ids but not in weights stay apart.
    weighted = deduplicate_features(full_kjt(weighted=True))
    assert weighted.stride_per_key() == [3, 4]
    assert weighted.inverse_indices()[1][0].tolist() == [0, 0, 1, 2]
    assert kjt_is_equal(expand_features(weighted), full_kjt(weighted=True))


def test_deduplicate_falls_back_to_exact_rows_on_a_hash_collision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A zero multiplier hashes each row by its last column only: rows that differ elsewhere
    # collide, and the check against each hash's first row must catch it.
    monkeypatch.setattr(variable_batch, "_MIX", 0)
    dedup = deduplicate_features(full_kjt(weighted=True))
    assert dedup.stride_per_key() == [3, 4]
    assert kjt_is_equal(expand_features(dedup), full_kjt(weighted=True))


def test_deduplicate_tells_id_zero_from_padding() -> None:
    kjt = KeyedJaggedTensor(["a"], torch.tensor([0, 0, 0]), lengths=torch.tensor([1, 2, 0, 0]))
    dedup = deduplicate_features(kjt)
    assert rows(dedup["a"]) == [[0], [0, 0], []]
    assert dedup.inverse_indices()[1].tolist() == [[0, 1, 2, 2]]


def test_deduplicate_and_expand_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match=r"keys \['nope'\] are not in the KJT"):
        deduplicate_features(full_kjt(), ["nope"])
    with pytest.raises(ValueError, match=r"already has a variable batch"):
        deduplicate_features(vbe_kjt())
    with pytest.raises(TypeError, match=r"1-D integer ids"):
        deduplicate_features(KeyedJaggedTensor(["a"], torch.ones(2), lengths=torch.tensor([2])))
    with pytest.raises(ValueError, match=r"keys \['user'\] have fewer samples than the batch"):
        expand_features(vbe_kjt(inverse=False))
