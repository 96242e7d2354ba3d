"""A variable batch per key in the pooled output distribution: each key's rows at its own stride.

A variable batch (``docs/vbe.md``) is routed as its unique samples, every key padded to the
largest key's count ``S`` (``FeatureRouter.route``). The ids and the lookup see that padded batch;
the pooled rows go back at each key's own count ``S_k``, not ``S``::

    sender:  key_strides                  [S_k of each routed key]   (None: a plain batch)
             append_key_strides           each owner's lengths block, then its keys' S_k
    owner:   stack_senders                strips them: StackedInput.strides[s][f]
             pooled_send_buffer(widths=)  sender s's rows of key f: S_f^s of them, not B_max
    sender:  vbe_recv_sizes               what each owner sends back (elements)
             pad_received                 each key's rows padded back to S (empty samples'
                                          rows are zero), then the plain path goes on: columns,
                                          partial sums, MEAN, and pooled_output's expansion to
                                          the full batch through the inverse indices

So a module that mixes user features (a few unique users) and item features (every sample)
sends the user keys' pooled rows once per user. The strides ride in the lengths message, so no
collective is added, and an owner tells each sender's layout from the sizes it declared (a
plain block holds ``keys x batch`` lengths, one with strides ``keys x (batch + 1)``): ranks may
send variable and plain batches in one step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from shardrec.modules._routing import FeatureRouter
from shardrec.sparse import KeyedJaggedTensor

__all__ = ["append_key_strides", "key_strides", "pad_received", "vbe_recv_sizes"]


def key_strides(router: FeatureRouter, kjt: KeyedJaggedTensor) -> list[int] | None:
    """Each key of ``router.route(kjt)``'s own number of samples, in routed order (a key read by
    two tables twice); None for a plain batch, or one whose routed keys all have one count
    (nothing to save)."""
    if not kjt.variable_stride_per_key():
        return None
    order = router.check(kjt)
    strides = kjt.stride_per_key()
    routed = strides if order is None else [strides[i] for i in order]
    return None if len(set(routed)) <= 1 else routed


def append_key_strides(
    lengths: torch.Tensor,
    lengths_per_rank: Sequence[int],
    strides: Sequence[int],
    keys_of: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, list[int]]:
    """The lengths of a jagged all-to-all with the strides of the keys each rank gets after its
    block: ``keys_of[r]`` indexes ``strides`` (the routed keys sent to rank ``r``, in order).
    A rank that gets no keys gets nothing more."""
    extra = [[strides[k] for k in keys] for keys in keys_of]
    tail = torch.tensor(
        [s for per_rank in extra for s in per_rank], dtype=lengths.dtype, device=lengths.device
    )
    blocks = torch.split(lengths, list(lengths_per_rank))
    tails = torch.split(tail, [len(e) for e in extra])
    pieces = [p for block, t in zip(blocks, tails, strict=True) for p in (block, t)]
    sizes = [n + len(e) for n, e in zip(lengths_per_rank, extra, strict=True)]
    return torch.cat(pieces), sizes


def split_key_strides(
    lengths: torch.Tensor,
    lengths_per_rank: Sequence[int],
    batches: Sequence[int],
    n_features: int,
) -> tuple[torch.Tensor, list[int], list[list[int]] | None]:
    """An owner's received lengths without the strides some senders appended
    (:func:`append_key_strides`): the lengths, their count per sender, and each sender's
    strides per key (a plain sender's: its batch); None when no sender appended any."""
    plain = [n_features * b for b in batches]
    if not n_features or list(lengths_per_rank) == plain:
        return lengths, list(lengths_per_rank), None
    for s, (n, p) in enumerate(zip(lengths_per_rank, plain, strict=True)):
        if n not in (p, p + n_features):
            raise ValueError(
                f"stack_senders: rank {s} sent {n} lengths for {n_features} keys and a batch of"
                f" {batches[s]}: neither a plain batch ({p}) nor one with its keys' strides"
            )
    blocks = torch.split(lengths, list(lengths_per_rank))
    kept = [block[:p] for block, p in zip(blocks, plain, strict=True)]
    tails = [block[p:] for block, p in zip(blocks, plain, strict=True)]
    read: list[int] = torch.cat(tails).tolist()
    strides: list[list[int]] = []
    for n, p, b in zip(lengths_per_rank, plain, batches, strict=True):
        if n == p:
            strides.append([b] * n_features)
        else:
            strides.append(read[:n_features])
            read = read[n_features:]
    return torch.cat(kept), plain, strides


def vbe_recv_sizes(
    strides: Sequence[int], keys_of: Sequence[Sequence[int]], widths_of: Sequence[Sequence[int]]
) -> list[int]:
    """Elements each owner sends back: its keys' rows at their own strides times their widths
    (``widths_of[r][i]``: the columns of owner ``r``'s ``i``-th key, ``keys_of[r][i]``)."""
    return [
        sum(strides[k] * w for k, w in zip(keys, widths, strict=True))
        for keys, widths in zip(keys_of, widths_of, strict=True)
    ]


def pad_received(
    flat: torch.Tensor,
    strides: Sequence[int],
    keys_of: Sequence[Sequence[int]],
    widths_of: Sequence[Sequence[int]],
    batch: int,
) -> torch.Tensor:
    """The received rows at each key's own stride as the plain layout: each owner's block
    ``[batch, its keys' widths side by side]``, flat, owner after owner (rows past a key's
    stride are zero: they belong to the padding's empty samples, which nothing reads).
    Differentiable: the padding's gradient is dropped."""
    sizes = vbe_recv_sizes(strides, keys_of, widths_of)
    out: list[torch.Tensor] = []
    for block, keys, widths in zip(torch.split(flat, sizes), keys_of, widths_of, strict=True):
        if not keys:
            continue
        pieces = torch.split(block, [strides[k] * w for k, w in zip(keys, widths, strict=True)])
        rows = [
            F.pad(piece.view(strides[k], w), (0, 0, 0, batch - strides[k]))
            for piece, k, w in zip(pieces, keys, widths, strict=True)
        ]
        out.append((rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)).reshape(-1))
    if not out:
        return flat.new_zeros(0)
    return out[0] if len(out) == 1 else torch.cat(out)
