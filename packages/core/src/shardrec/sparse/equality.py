"""Equality of jagged containers by content, for tests and assertions (TorchRec's helpers)."""

from __future__ import annotations

import torch

from shardrec.sparse.jagged_tensor import JaggedTensor
from shardrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor

__all__ = ["jt_is_equal", "kjt_is_equal"]


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Both absent, or the same shape with values within ``torch.allclose``'s tolerance."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.allclose(a, b.to(a.dtype)))


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.long(), b.long())


def jt_is_equal(jt_1: object, jt_2: object) -> bool:
    """Whether two JaggedTensors hold the same rows: equal lengths, close values, and close
    weights or none on both. Built from lengths or from offsets makes no difference. Anything
    that is not a JaggedTensor compares unequal. Reads contents (a device sync)."""
    if not isinstance(jt_1, JaggedTensor) or not isinstance(jt_2, JaggedTensor):
        return False
    return (
        _same_rows(jt_1.lengths(), jt_2.lengths())
        and _close(jt_1.values(), jt_2.values())
        and _close(jt_1.weights_or_none(), jt_2.weights_or_none())
    )


def kjt_is_equal(kjt_1: object, kjt_2: object) -> bool:
    """Whether two KeyedJaggedTensors hold the same batch: the same keys in the same order, the
    same stride (per key, and per rank for a variable batch) and lengths, equal inverse indices or
    none on both, close values, and close weights or none on both. Reads contents."""
    if not isinstance(kjt_1, KeyedJaggedTensor) or not isinstance(kjt_2, KeyedJaggedTensor):
        return False
    inverse_1, inverse_2 = kjt_1.inverse_indices_or_none(), kjt_2.inverse_indices_or_none()
    if (inverse_1 is None) != (inverse_2 is None):
        return False
    if (
        inverse_1 is not None
        and inverse_2 is not None
        and (inverse_1[0] != inverse_2[0] or not _same_rows(inverse_1[1], inverse_2[1]))
    ):
        return False
    return (
        kjt_1.keys() == kjt_2.keys()
        and kjt_1.stride() == kjt_2.stride()
        and kjt_1.stride_per_key_per_rank() == kjt_2.stride_per_key_per_rank()
        and _same_rows(kjt_1.lengths(), kjt_2.lengths())
        and _close(kjt_1.values(), kjt_2.values())
        and _close(kjt_1.weights_or_none(), kjt_2.weights_or_none())
    )
