"""What a TorchRec user relies on from the sparse containers, with TorchRec's meanings.

The containers hold what TorchRec's hold: float values, rows of embeddings ``(N, D)``, integer
weights, empty lengths of any dtype. Each test below is one such promise, written from TorchRec's
documented behaviour (docs/torchrec_compat.md lists them with the deliberate differences).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from shardrec import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from shardrec.distributed.types import ModuleSharder
from shardrec.sparse import jt_is_equal, kjt_is_equal

KEYS = ["product", "user"]


def float_kjt(weights: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """product: [[1., 2.], [], [3.]]   user: [[4.], [5.], [6.]]"""
    return KeyedJaggedTensor(
        KEYS,
        torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        weights=weights,
        lengths=torch.tensor([2, 0, 1, 1, 1, 1], dtype=torch.int32),
    )


def rows(jt: JaggedTensor) -> list[list[object]]:
    return [t.tolist() for t in jt.to_dense()]


# -- what the containers hold ---------------------------------------------------------------------


def test_kjt_holds_float_values_and_integer_weights() -> None:
    kjt = float_kjt(weights=torch.tensor([7, 8, 9, 10, 11, 12]))
    assert rows(kjt["product"]) == [[1.0, 2.0], [], [3.0]]
    assert kjt["user"].weights().tolist() == [10, 11, 12]
    kjt.validate()


def test_kjt_holds_embedding_rows() -> None:
    values = torch.arange(12.0).view(6, 2)
    kjt = KeyedJaggedTensor(KEYS, values, lengths=torch.tensor([2, 0, 1, 1, 1, 1]))
    user = kjt.to_dict()["user"]
    assert user.values().tolist() == [[6.0, 7.0], [8.0, 9.0], [10.0, 11.0]]
    permuted = kjt.permute([1, 0])
    assert permuted["product"].values().shape == (3, 2)
    first, second = kjt.split([1, 1])
    assert torch.equal(KeyedJaggedTensor.concat([first, second]).values(), values)


def test_empty_float_lengths_are_no_rows() -> None:
    kjt = KeyedJaggedTensor(KEYS, torch.tensor([]), lengths=torch.tensor([[], []]))
    assert kjt.stride() == 0
    assert kjt.length_per_key() == [0, 0]
    product = kjt.to_dict()["product"]
    assert product.lengths().numel() == 0
    assert product.offsets().numel() == 0  # TorchRec's empty offsets for no rows


def test_integer_ids_are_checked_by_the_lookup_not_the_container() -> None:
    # A float KJT is a valid container; the embedding module is what refuses it.
    assert float_kjt().values().dtype == torch.float32


# -- members TorchRec has -------------------------------------------------------------------------


def test_size_in_bytes() -> None:
    kjt = float_kjt(weights=torch.ones(6, dtype=torch.float64))
    # values 6 x 4, weights 6 x 8, lengths 6 x 4 (offsets not derived yet)
    assert kjt.size_in_bytes() == 24 + 48 + 24
    kjt.offsets()  # derived offsets count once they exist: 7 x 4
    assert kjt.size_in_bytes() == 24 + 48 + 24 + 28
    jt = JaggedTensor(torch.ones(3, 2), lengths=torch.tensor([3])).validate()
    assert jt.size_in_bytes() == 3 * 2 * 4 + 8
    assert KeyedTensor(["a"], [2], torch.zeros(4, 2)).size_in_bytes() == 32


def test_clear_storage_frees_every_tensor() -> None:
    kjt = float_kjt(weights=torch.ones(6))
    values, lengths = kjt.values(), kjt.lengths()
    assert kjt.clear_storage() == 24 + 24 + 24
    assert values.untyped_storage().size() == 0
    assert lengths.untyped_storage().size() == 0
    # What is left is a consistent KJT of the same keys with no samples, safe to print.
    assert kjt.keys() == KEYS
    assert kjt.stride() == 0
    assert kjt.values().numel() == 0
    assert kjt.length_per_key() == [0, 0]
    assert kjt.to_dict()["user"].lengths().numel() == 0
    assert "KeyedJaggedTensor" in repr(kjt) + str(kjt)
    kjt.validate()


def test_to_dict_offsets() -> None:
    kjt = float_kjt()
    lazy = kjt.to_dict(compute_offsets=False)["product"]
    assert lazy.offsets_or_none() is None
    assert lazy.offsets().tolist() == [0, 2, 2, 3]
    assert kjt.to_dict()["user"].offsets().tolist() == [0, 1, 2, 3]


def test_jagged_tensor_empty_like() -> None:
    jt = JaggedTensor(
        torch.ones(3, 2, dtype=torch.float16),
        weights=torch.ones(3, dtype=torch.int64),
        lengths=torch.tensor([1, 2], dtype=torch.int32),
    )
    empty = JaggedTensor.empty_like(jt)
    assert empty.values().shape == (0, 2)
    assert empty.values().dtype == torch.float16
    assert empty.weights().dtype == torch.int64
    assert empty.lengths().dtype == torch.int32
    assert empty.to_dense() == []
    buffer = JaggedTensor.empty_like(jt, device="cpu")  # a buffer shaped like jt
    assert buffer.values().shape == (3, 2)
    assert buffer.lengths().shape == (2,)
    assert buffer.offsets_or_none() is None


def test_keyed_jagged_tensor_empty_like() -> None:
    kjt = float_kjt()
    empty = KeyedJaggedTensor.empty_like(kjt)
    assert empty.keys() == []
    assert empty.stride() == 3
    assert empty.values().dtype == torch.float32
    buffer = KeyedJaggedTensor.empty_like(kjt, device="cpu")
    assert buffer.keys() == KEYS
    assert buffer.values().shape == (6,)


def test_module_sharder_is_generic() -> None:
    assert ModuleSharder[nn.Module] is not None

    class Sharder:
        module_type = nn.Linear

        def sharding_types(self, compute_device_type: str) -> list[str]:
            return []

        def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
            return []

        def storage_usage(
            self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str
        ) -> dict[str, int]:
            return {}

        def shard(self, module: nn.Module, params: object, env: object, device: object) -> None:
            return None

    assert isinstance(Sharder(), ModuleSharder)  # runtime check unchanged


# -- padded forms ---------------------------------------------------------------------------------


def test_to_padded_dense_with_rows_of_values() -> None:
    values = torch.arange(12).view(4, 3)
    # Lengths cover three of the four value rows: the fourth belongs to no row.
    jt = JaggedTensor(values, lengths=torch.tensor([1, 0, 2, 0], dtype=torch.int32))
    dense = jt.to_padded_dense(desired_length=3)
    assert dense.shape == (4, 3, 3)
    assert dense[0, 0].tolist() == [0, 1, 2]
    assert dense[2, :2].tolist() == [[3, 4, 5], [6, 7, 8]]
    assert dense[1].tolist() == [[0, 0, 0]] * 3
    assert rows(jt) == [[[0, 1, 2]], [], [[3, 4, 5], [6, 7, 8]], []]


def test_to_padded_dense_weights_with_rows_of_weights() -> None:
    weights = torch.arange(8.0).view(4, 2)
    jt = JaggedTensor(torch.arange(4), weights=weights, lengths=torch.tensor([3, 1]))
    dense = jt.to_padded_dense_weights(desired_length=2, padding_value=-1.0)
    assert dense is not None
    assert dense.tolist() == [[[0.0, 1.0], [2.0, 3.0]], [[6.0, 7.0], [-1.0, -1.0]]]


# -- printing -------------------------------------------------------------------------------------


def test_str_is_torchrec_layout() -> None:
    jt = JaggedTensor(torch.tensor([1.0, 2.0, 3.0]), lengths=torch.tensor([1, 0, 2]))
    assert str(jt) == "JaggedTensor({\n    [[1.0], [], [2.0, 3.0]]\n})\n"
    weighted = JaggedTensor(
        torch.tensor([1, 2]), weights=torch.tensor([0.5, 1.0]), lengths=torch.tensor([2])
    )
    assert str(weighted) == (
        'JaggedTensor({\n    "values": [[1, 2]],\n    "weights": [[0.5, 1.0]]\n})\n'
    )
    assert str(float_kjt()) == (
        'KeyedJaggedTensor({\n    "product": [[1.0, 2.0], [], [3.0]],\n'
        '    "user": [[4.0], [5.0], [6.0]]\n})\n'
    )
    assert str(float_kjt(torch.ones(6))).startswith(
        'KeyedJaggedTensor({\n    "product": {\n        "values": [[1.0, 2.0], [], [3.0]],\n'
        '        "weights": [[1.0, 1.0], [], [1.0]]\n    },'
    )
    kt = KeyedTensor(["a", "b"], [1, 2], torch.tensor([[1.0, 2.0, 3.0]]))
    assert str(kt) == 'KeyedTensor({\n    "a": [[1.0]],\n    "b": [[2.0, 3.0]]\n})\n'
    assert str(KeyedTensor([], [], torch.Tensor())) == "KeyedTensor()\n"
    assert "KeyedJaggedTensor(" in repr(float_kjt())  # repr stays the compact form


# -- meta device ----------------------------------------------------------------------------------


def test_meta_tensors_sync_with_placeholder_sizes() -> None:
    meta = torch.device("meta")
    kjt = KeyedJaggedTensor.from_offsets_sync(
        keys=["a", "b", "c"],
        values=torch.empty(10, device=meta),
        offsets=torch.empty(7, dtype=torch.int64, device=meta),
    )
    # No contents to count: sizes that cover the values, the remainder on the first key.
    assert kjt.length_per_key() == [4, 3, 3]
    jts = kjt.to_dict()
    assert jts["a"].values().shape == (4,)
    again = KeyedJaggedTensor.from_jt_dict(jts)
    assert again.keys() == ["a", "b", "c"]
    assert again.device() == meta


# -- pytree flatten specs (what exported programs use) --------------------------------------------


def test_keyed_tensor_flatten_spec_reorders_keys() -> None:
    kt = KeyedTensor(["a", "b"], [1, 2], torch.tensor([[1.0, 2.0, 3.0]]))
    _, spec = pytree.tree_flatten(kt)
    reordered = KeyedTensor(["b", "a"], [2, 1], torch.tensor([[2.0, 3.0, 1.0]]))
    flat = tree_flatten_spec(reordered, spec)
    assert flat[0].tolist() == [[1.0, 2.0, 3.0]]
    back = pytree.tree_unflatten(flat, spec)
    assert back["b"].tolist() == [[2.0, 3.0]]


def test_kjt_flatten_spec_derives_missing_fields() -> None:
    with_lengths = float_kjt()
    _, spec = pytree.tree_flatten(with_lengths)
    with_offsets = KeyedJaggedTensor(
        KEYS, with_lengths.values(), offsets=with_lengths.offsets().clone()
    )
    flat = tree_flatten_spec(with_offsets, spec)
    assert [t.tolist() for t in flat] == [
        with_lengths.values().tolist(),
        with_lengths.lengths().tolist(),
    ]


# -- equality helpers -----------------------------------------------------------------------------


def test_jt_is_equal() -> None:
    by_lengths = JaggedTensor(torch.tensor([1.0, 2.0, 3.0]), lengths=torch.tensor([1, 2]))
    by_dense = JaggedTensor.from_dense_lengths(
        torch.tensor([[1.0, 9.0], [2.0, 3.0]]), torch.tensor([1, 2])
    )
    assert jt_is_equal(by_lengths, by_dense)
    other_rows = JaggedTensor(torch.tensor([1.0, 2.0, 3.0]), lengths=torch.tensor([2, 1]))
    assert not jt_is_equal(by_lengths, other_rows)
    weighted = JaggedTensor(
        by_lengths.values(), weights=torch.ones(3), lengths=torch.tensor([1, 2])
    )
    assert not jt_is_equal(by_lengths, weighted)
    assert not jt_is_equal(by_lengths, "not a JaggedTensor")


def test_kjt_is_equal() -> None:
    by_lengths = float_kjt()
    by_offsets = KeyedJaggedTensor(KEYS, by_lengths.values(), offsets=by_lengths.offsets())
    assert kjt_is_equal(by_lengths, by_offsets)
    assert not kjt_is_equal(by_lengths, by_lengths.permute([1, 0]))
    assert not kjt_is_equal(by_lengths, float_kjt(weights=torch.ones(6)))
    assert not kjt_is_equal(by_lengths, by_lengths.to_dict())


# -- split with empty segments, as TorchRec splits ------------------------------------------------


@pytest.mark.parametrize("segments", [[0, 2], [2, 0], [0, 0, 2], [1, 0, 1], [0, 2, 0]])
def test_split_with_empty_segments(segments: list[int]) -> None:
    kjt = float_kjt(weights=torch.arange(6.0))
    parts = kjt.split(segments)
    assert [part.keys() for part in parts] == [
        KEYS[sum(segments[:i]) : sum(segments[: i + 1])] for i in range(len(segments))
    ]
    for part, size in zip(parts, segments, strict=True):
        assert part.stride() == 3
        if size == 0:
            assert part.values().numel() == 0
            assert part.weights().numel() == 0
            assert part.lengths().numel() == 0
            assert part.offsets().numel() == 0  # TorchRec's offsets for an empty segment
            assert part.length_per_key() == []
            assert part.offset_per_key() == [0]
    rebuilt = KeyedJaggedTensor.concat(parts)
    assert kjt_is_equal(rebuilt, kjt)


# -- copy_ into a buffer --------------------------------------------------------------------------


def test_copy_into_an_empty_like_buffer() -> None:
    source = float_kjt(weights=torch.arange(6.0)).sync()
    buffer = KeyedJaggedTensor.empty_like(source, device="cpu")
    assert buffer.copy_(source) is buffer
    assert kjt_is_equal(buffer, source)
    assert buffer.length_per_key() == [3, 3]
    jt = source["user"]
    jt_buffer = JaggedTensor.empty_like(jt, device="cpu")
    assert jt_is_equal(jt_buffer.copy_(jt), jt)


def test_copy_refuses_what_would_broadcast() -> None:
    target = float_kjt()
    smaller = KeyedJaggedTensor(KEYS, torch.ones(1), lengths=torch.tensor([1, 0, 0, 0, 0, 0]))
    before = target.values().clone()
    with pytest.raises(ValueError, match=r"copy_: values has shape \(6,\) here but \(1,\)"):
        target.copy_(smaller)
    assert torch.equal(target.values(), before)  # nothing copied
    with pytest.raises(ValueError, match=r"the source has keys \['user'\]"):
        target.copy_(
            KeyedJaggedTensor(["user"], torch.ones(3), lengths=torch.ones(3, dtype=torch.long))
        )
    weighted = KeyedJaggedTensor.empty_like(float_kjt(torch.ones(6)), device="cpu")
    with pytest.raises(ValueError, match=r"this has weights but the source has none"):
        weighted.copy_(float_kjt())


# -- variable batch per feature (TorchRec's VBE names and meanings) ------------------------------


def vb_kjt(**extra: object) -> KeyedJaggedTensor:
    """product has 2 samples, user 4: offsets cover 2 + 4 rows."""
    return KeyedJaggedTensor(
        KEYS,
        torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
        offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8], dtype=torch.int32),
        stride_per_key_per_rank=[[2], [4]],
        **extra,  # type: ignore[arg-type]
    )


def test_vb_stride_is_the_largest_key_or_the_inverse_width() -> None:
    assert vb_kjt().stride() == 4
    inverse = torch.tensor([[0, 1, 0], [0, 0, 0]])
    assert vb_kjt(inverse_indices=(KEYS, inverse)).stride() == 3
    # Strides of fewer keys than the KJT holds: the batch size still comes from the inverse table.
    short = KeyedJaggedTensor(
        ["a", "b", "c"],
        torch.arange(8),
        lengths=torch.tensor([3, 3, 2]),
        stride_per_key_per_rank=[[2], [1]],
        inverse_indices=(["a", "b"], inverse),
    )
    assert short.stride() == 3
    empty = KeyedJaggedTensor(
        ["a"], torch.tensor([]), lengths=torch.tensor([]), stride_per_key_per_rank=[[]]
    )
    assert empty.stride() == 0


def test_vb_per_key_views_and_printing() -> None:
    kjt = vb_kjt(weights=torch.arange(8.0))
    assert kjt["product"].lengths().tolist() == [2, 0]
    assert kjt.to_dict()["user"].weights().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    two_ranks = KeyedJaggedTensor(
        KEYS, kjt.values(), offsets=kjt.offsets(), stride_per_key_per_rank=[[1, 1], [1, 3]]
    )
    assert str(two_ranks) == (
        'KeyedJaggedTensor({\n    "product": [[1.0, 2.0], []],\n'
        '    "user": [[3.0], [4.0], [5.0], [6.0, 7.0, 8.0]]\n})\n'
    )


def test_vb_split_keeps_the_parents_stride_and_from_jt_dict_makes_one() -> None:
    first, second = vb_kjt().split([1, 1])
    assert first.stride() == second.stride() == 4
    assert first.stride_per_key_per_rank() == [[2]]
    again = KeyedJaggedTensor.from_jt_dict(vb_kjt().to_dict())
    assert again.variable_stride_per_key()
    assert again.stride_per_key_per_rank() == [[2], [4]]


def test_vb_pytree_keeps_strides_and_inverse_indices() -> None:
    kjt = vb_kjt(inverse_indices=(KEYS, torch.tensor([[0, 1, 0], [0, 0, 0]])))
    leaves, spec = pytree.tree_flatten(kjt)
    back = pytree.tree_unflatten(leaves, spec)
    assert back.lengths_or_none() is None  # built from offsets, as the original
    assert back.stride_per_key_per_rank() == [[2], [4]]
    assert back.inverse_indices()[0] == KEYS
    assert torch.equal(back.inverse_indices()[1], kjt.inverse_indices()[1])
    plain = pytree.tree_unflatten(*pytree.tree_flatten(float_kjt()))
    assert plain.stride_per_key_per_rank() == []
    assert plain.inverse_indices_or_none() is None
