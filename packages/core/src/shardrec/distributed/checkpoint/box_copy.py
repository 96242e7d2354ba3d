"""Copies into a rank's shards from a loaded value, planned as views so that nothing is held twice.

A load writes each local shard (a box of the global tensor: offsets and sizes) from a value that
is either a full tensor or a ShardedTensor whose local shards cover the box. The copies are
planned first, as pairs of views (a piece of the destination, the piece of the source that lands
there), and checked (the pieces cover the box exactly once) before any is made: a load that cannot
be completed writes nothing, and no intermediate tensor the size of a table is ever allocated. A
piece whose source is its destination (a load that read straight into the model's tensors) is
left out.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shardrec.distributed.checkpoint.errors import CheckpointError

__all__ = ["Copy", "box_copies", "is_sharded"]

Copy = tuple[torch.Tensor, torch.Tensor]  # (destination view, source view)


def is_sharded(value: Any) -> bool:
    """Whether ``value`` is a ShardedTensor (imported only when asked)."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    return isinstance(value, ShardedTensor)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def _narrow(t: torch.Tensor, lo: list[int], hi: list[int]) -> torch.Tensor:
    for d, (a, b) in enumerate(zip(lo, hi, strict=True)):
        t = t.narrow(d, a, b - a)
    return t


def _overlap(a: tuple[list[int], list[int]], b: tuple[list[int], list[int]]) -> bool:
    return all(
        max(a_lo, b_lo) < min(a_hi, b_hi)
        for a_lo, a_hi, b_lo, b_hi in zip(a[0], a[1], b[0], b[1], strict=True)
    )


def box_copies(dst: torch.Tensor, value: Any, offsets: tuple[int, ...], key: str) -> list[Copy]:
    """The copies that fill ``dst`` (the box of the global tensor at ``offsets``, of ``dst``'s
    shape) from ``value``: a full tensor, or a ShardedTensor whose local shards cover the box.
    Raises :class:`CheckpointError` naming ``key`` when they do not."""
    shape = tuple(dst.shape)
    if not is_sharded(value):
        src = _narrow(value, list(offsets), [o + n for o, n in zip(offsets, shape, strict=True)])
        return [] if _same_memory(dst, src) else [(dst, src)]
    pieces: list[tuple[list[int], list[int], torch.Tensor]] = []  # lo, hi (global), source
    for shard in value.local_shards():
        so = list(shard.metadata.shard_offsets)
        ss = list(shard.metadata.shard_sizes)
        lo = [max(a, b) for a, b in zip(offsets, so, strict=True)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, shape, so, ss, strict=True)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue
        src = _narrow(
            shard.tensor,
            [a - b for a, b in zip(lo, so, strict=True)],
            [a - b for a, b in zip(hi, so, strict=True)],
        )
        pieces.append((lo, hi, src))
    covered = sum(math.prod(h - low for low, h in zip(lo, hi, strict=True)) for lo, hi, _ in pieces)
    overlap = any(_overlap(p[:2], q[:2]) for i, p in enumerate(pieces) for q in pieces[i + 1 :])
    if overlap or covered != math.prod(shape):
        raise CheckpointError(
            f"{key}: the given ShardedTensor does not hold this rank's box at offsets {offsets}, "
            f"shape {shape} locally"
        )
    copies: list[Copy] = []
    for lo, hi, src in pieces:
        part = _narrow(
            dst,
            [a - o for a, o in zip(lo, offsets, strict=True)],
            [a - o for a, o in zip(hi, offsets, strict=True)],
        )
        if not _same_memory(part, src):
            copies.append((part, src))
    return copies
