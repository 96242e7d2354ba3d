"""The building blocks that send a variable batch's pooled rows at each key's own stride, on one
process: the strides riding with the lengths, the owner's send buffer, the receiver's padding.
(The sharders built of them are checked on 2 processes in tests/sharders/test_vbe.py.)"""

from __future__ import annotations

import pytest
import torch

from shardrec import KeyedJaggedTensor
from shardrec.distributed import comm
from shardrec.distributed.sharding import (
    FeatureRouter,
    StackedInput,
    append_key_strides,
    key_strides,
    pad_received,
    pooled_send_buffer,
    stack_senders,
    take_key_strides,
    vbe_recv_sizes,
)
from shardrec.sparse import deduplicate_features


def _batch() -> KeyedJaggedTensor:
    # user: 2 distinct samples of 4; item: 4 of 4.
    return KeyedJaggedTensor(
        ["user", "item"],
        torch.tensor([7, 8, 7, 8, 9, 9, 1, 2, 3, 4, 5]),
        lengths=torch.tensor([2, 2, 1, 1, 1, 1, 1, 2]),
    )


def test_key_strides_follow_the_routed_keys() -> None:
    vbe = deduplicate_features(_batch(), ["user"])
    # A table reading item then user, and a second table reading user again.
    router = FeatureRouter(["item", "user", "user"], owner="test")
    assert key_strides(router, vbe) == [4, 2, 2]
    assert key_strides(router, _batch()) is None  # plain
    assert key_strides(FeatureRouter(["user"], owner="test"), vbe) is None  # one count


def _result(blocks: list[torch.Tensor], batches: list[int]) -> comm.JaggedAllToAllResult:
    return comm.JaggedAllToAllResult(
        torch.cat(blocks),
        torch.zeros(0, dtype=torch.int64),
        None,
        [int(b.numel()) for b in blocks],
        [0] * len(blocks),
        batches,
    )


def test_strides_ride_after_each_owners_lengths() -> None:
    lengths = torch.arange(12, dtype=torch.int32)  # 3 keys x batch 4: keys 0, 1 -> rank 0
    sent, per_rank = append_key_strides(lengths, [8, 4], [2, 4, 1], [[0, 1], [2]])
    assert per_rank == [10, 5]
    assert sent.tolist() == [*range(8), 2, 4, 8, 9, 10, 11, 1]
    assert sent.dtype == lengths.dtype
    # What rank 0 receives: its own block with strides, and a plain block from a peer.
    got, strides = take_key_strides(_result([sent[:10], torch.arange(6)], [4, 3]), 2)
    assert strides == [[2, 4], None]
    assert got.lengths.tolist() == [*range(8), *range(6)]
    assert got.lengths_per_rank == [8, 6]
    # Nothing appended: the result as it is, and no host read.
    plain = _result([torch.arange(8)], [4])
    assert take_key_strides(plain, 2) == (plain, None)
    # A node's strides for more keys than the rank's own lengths (table-row-wise).
    got, strides = take_key_strides(_result([torch.tensor([1, 2, 3, 4, 9, 8, 7])], [4]), 1, 3)
    assert strides == [[9, 8, 7]]
    assert got.lengths.tolist() == [1, 2, 3, 4]


def test_a_block_of_the_wrong_size_names_the_rank() -> None:
    with pytest.raises(ValueError, match=r"rank 1 sent 5 lengths for 2 keys and a batch of 2"):
        take_key_strides(_result([torch.arange(4), torch.arange(5)], [2, 2]), 2)


def _stacked(strides: list[list[int] | None]) -> StackedInput:
    return StackedInput(
        values=torch.zeros(0, dtype=torch.int64),
        offsets=torch.zeros(1, dtype=torch.int64),
        weights=None,
        length_per_feature=[0, 0],
        batch=3,
        batches=[3, 2],
        seg_len=[[0, 0], [0, 0]],
        strides=strides,
    )


def test_the_owner_sends_each_keys_rows_and_the_receiver_pads_them_back() -> None:
    # Two keys (1 and 2 columns) of 2 senders stacked, 3 rows each; sender 0 sent strides.
    out = torch.arange(18, dtype=torch.float32).view(6, 3).requires_grad_()
    send, sizes = pooled_send_buffer(out, _stacked([[1, 3], None]), [1, 2])
    assert sizes == [1 * 1 + 3 * 2, 2 * 3]
    first, second = torch.split(send, sizes)
    assert first.tolist() == [0, 1, 2, 4, 5, 7, 8]  # key 0's row 0; key 1's rows 0-2
    assert second.tolist() == list(range(9, 15))  # sender 1's plain [2, 3] block
    # Sender 0 pads what it got back to its batch of 3: key 0's rows past its stride are zero.
    assert vbe_recv_sizes([1, 3], [[0, 1]], [[1, 2]]) == [7]
    padded = pad_received(first, [1, 3], [[0, 1]], [[1, 2]], 3)
    assert padded.view(3, 3).tolist() == [[0, 1, 2], [0, 4, 5], [0, 7, 8]]
    torch.autograd.backward(padded.sum())
    assert out.grad is not None
    # Sender 0's padding rows get no gradient; sender 1's third row (past its batch) neither.
    assert out.grad[:3].tolist() == [[1, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert out.grad[3:].sum() == 0


def test_the_send_buffer_needs_the_keys_widths() -> None:
    out = torch.zeros(6, 3)
    with pytest.raises(ValueError, match="give each key's widths"):
        pooled_send_buffer(out, _stacked([[1, 3], None]))
    with pytest.raises(ValueError, match=r"widths \[1, 1\] do not cut"):
        pooled_send_buffer(out, _stacked([[1, 3], None]), [1, 1])


def test_stack_senders_strips_the_strides() -> None:
    got = _result([torch.tensor([1, 0, 2, 1, 1, 2]), torch.tensor([1, 1, 0, 0])], [2, 2])
    got = comm.JaggedAllToAllResult(
        got.lengths, torch.arange(6), None, got.lengths_per_rank, [4, 2], [2, 2]
    )
    stacked = stack_senders(got, 2)
    assert stacked.strides == [[1, 2], None]
    # Key-major: key 0 of senders 0 and 1, then key 1.
    assert stacked.offsets.tolist() == [0, 1, 1, 2, 3, 5, 6, 6, 6]
    assert stacked.seg_len == [[1, 3], [2, 0]]
    assert stacked.values.tolist() == [0, 4, 5, 1, 2, 3]
