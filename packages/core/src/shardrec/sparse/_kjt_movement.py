"""KeyedJaggedTensor operations that move or free its tensors: to, pin_memory, copy_, clear."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor

_OWNER = "KeyedJaggedTensor"


def mapped(
    kjt: KeyedJaggedTensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    weights: torch.Tensor | None,
) -> KeyedJaggedTensor:
    """``kjt`` with ``fn`` applied to each tensor but the weights, which are given; the host-side
    sizes carry over."""

    def apply(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else fn(t)

    inverse = kjt._inverse_indices
    return type(kjt)._trusted(
        kjt._keys,
        kjt._key_index,
        fn(kjt._values),
        weights,
        apply(kjt._lengths),
        apply(kjt._offsets),
        kjt._stride,
        kjt._length_per_key,
        kjt._offset_per_key,
        kjt._stride_per_key_per_rank,
        None if inverse is None else (inverse[0], fn(inverse[1])),
    )


def copy_into(target: KeyedJaggedTensor, source: KeyedJaggedTensor, non_blocking: bool) -> None:
    if (
        source._keys != target._keys
        or source._stride != target._stride
        or source.stride_per_key() != target.stride_per_key()
    ):
        raise ValueError(
            f"{_OWNER}.copy_: the source has keys {source._keys} and stride {source._stride} "
            f"({source.stride_per_key()} per key), this KJT {target._keys} and {target._stride} "
            f"({target.stride_per_key()})"
        )
    mine, theirs = target._inverse_indices, source._inverse_indices
    if mine is not None and (theirs is None or theirs[1].shape != mine[1].shape):
        raise ValueError(
            f"{_OWNER}.copy_: this has inverse_indices of shape {tuple(mine[1].shape)} but the "
            f"source {'has none' if theirs is None else tuple(theirs[1].shape)}"
        )
    target._copy_from(source, non_blocking)
    if mine is not None and theirs is not None:
        mine[1].copy_(theirs[1], non_blocking=non_blocking)
    target._length_per_key = source._length_per_key
    target._offset_per_key = source._offset_per_key


def clear_storage(kjt: KeyedJaggedTensor) -> int:
    freed = kjt.size_in_bytes()
    with torch.no_grad():  # set_ on a tensor that requires grad
        for t in (kjt._values, kjt._weights, kjt._lengths, kjt._offsets):
            if t is not None:
                storage = t.untyped_storage()
                storage.resize_(0)
                t.set_(storage, 0, (0, *t.shape[1:]), t.stride())
    kjt._stride = 0
    if kjt._stride_per_key_per_rank is not None:
        kjt._stride_per_key_per_rank = [[0] * len(r) for r in kjt._stride_per_key_per_rank]
        kjt._stride_per_key = [0] * len(kjt._keys)
    kjt._inverse_indices = None
    kjt._set_length_per_key([0] * len(kjt._keys))
    return freed
