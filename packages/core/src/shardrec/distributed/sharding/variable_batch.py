"""A variable batch per key in the pooled output distribution: each key's rows at its own stride.

A variable batch (``docs/vbe.md``) is routed as its unique samples, every key padded to the
largest key's count ``S`` (``FeatureRouter.route``). The ids and the lookup see that padded batch;
the pooled rows go back at each key's own count ``S_k``, not ``S``::

    sender:  key_strides                  [S_k of each routed key]   (None: a plain batch)
             append_key_strides           each owner's lengths block, then its keys' S_k
    owner:   stack_senders                strips them (take_key_strides): StackedInput.strides
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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shardrec.distributed import comm
from shardrec.modules._routing import FeatureRouter
from shardrec.sparse import KeyedJaggedTensor

__all__ = [
    "Rect",
    "append_key_strides",
    "key_strides",
    "pack_rects",
    "pad_received",
    "take_key_strides",
    "vbe_recv_sizes",
]


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


def take_key_strides(
    got: comm.JaggedAllToAllResult, n_features: int, n_strides: int | None = None
) -> tuple[comm.JaggedAllToAllResult, list[list[int] | None] | None]:
    """An owner's jagged all-to-all result without the strides some senders appended
    (:func:`append_key_strides`), and each sender's ``n_strides`` strides (default: one per
    feature), None for a sender that sent a plain batch (its rows go back as a plain block);
    None when no sender appended any. ``n_features``: the keys whose lengths each sender sent
    here. One host read, only when strides came."""
    n_strides = n_features if n_strides is None else n_strides
    batches = list(got.batch_per_rank)
    sent = list(got.lengths_per_rank)
    plain = [n_features * b for b in batches]
    if not n_strides or got.rejected_by or sent == plain:
        return got, None
    for s, (n, p) in enumerate(zip(sent, plain, strict=True)):
        if n not in (p, p + n_strides):
            raise ValueError(
                f"rank {s} sent {n} lengths for {n_features} keys and a batch of {batches[s]}:"
                f" neither a plain batch ({p}) nor one followed by {n_strides} key strides"
            )
    blocks = torch.split(got.lengths, sent)
    kept = [block[:p] for block, p in zip(blocks, plain, strict=True)]
    read: list[int] = torch.cat(
        [block[p:] for block, p in zip(blocks, plain, strict=True)]
    ).tolist()
    strides: list[list[int] | None] = []
    for n, p in zip(sent, plain, strict=True):
        if n == p:
            strides.append(None)
        else:
            strides.append(read[:n_strides])
            read = read[n_strides:]
    lengths = torch.cat(kept) if kept else got.lengths[:0]
    return dataclasses.replace(got, lengths=lengths, lengths_per_rank=plain), strides


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
    """The received rows at each key's own stride (key by key, each ``[stride, width]``: what
    ``pooled_send_buffer`` sends a rank that sent its strides) as the plain layout: each
    owner's block ``[batch, its keys' widths side by side]``, flat, owner after owner (rows
    past a key's stride are zero: they belong to the padding's empty samples, which nothing
    reads). Differentiable: the padding's gradient is dropped."""
    rects: list[Rect] = []
    base = 0
    for keys, widths in zip(keys_of, widths_of, strict=True):
        width, col = sum(widths), 0
        for k, w in zip(keys, widths, strict=True):
            rects.append(Rect(base + col, strides[k], w, width))
            col += w
        base += batch * width
    out: torch.Tensor = _Unpack.apply(flat, base, rects)  # type: ignore[no-untyped-call]
    return out


@dataclass(frozen=True, slots=True)
class Rect:
    """Rows x cols of a flat buffer read as a matrix whose rows are ``stride`` apart, from
    ``offset``: a key's rows of one sender in a wider block."""

    offset: int
    rows: int
    cols: int
    stride: int

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.as_strided((self.rows, self.cols), (self.stride, 1), self.offset)


def pack_rects(flat: torch.Tensor, rects: Sequence[Rect]) -> torch.Tensor:
    """The ``rects`` of a contiguous 1-D ``flat``, each row-major, one after another (one copy;
    differentiable, the backward writes them back into zeros: one fill and one copy)."""
    out: torch.Tensor = _Pack.apply(flat, list(rects))  # type: ignore[no-untyped-call]
    return out


def _gather(flat: torch.Tensor, rects: Sequence[Rect]) -> torch.Tensor:
    pieces = [r.of(flat).reshape(-1) for r in rects if r.rows and r.cols]
    if not pieces:
        return flat.new_zeros(0)
    return pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces)


def _scatter(packed: torch.Tensor, numel: int, rects: Sequence[Rect]) -> torch.Tensor:
    out = packed.new_zeros(numel)
    at = 0
    for r in rects:
        n = r.rows * r.cols
        if n:
            r.of(out).copy_(packed[at : at + n].view(r.rows, r.cols))
        at += n
    return out


class _Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, rects: list[Rect]) -> torch.Tensor:
        ctx.meta = (flat.numel(), rects)
        return _gather(flat.contiguous(), rects)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        numel, rects = ctx.meta
        return _scatter(grad.contiguous(), numel, rects), None


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, numel: int, rects: list[Rect]) -> torch.Tensor:
        ctx.rects = rects
        return _scatter(packed.contiguous(), numel, rects)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _gather(grad.contiguous(), ctx.rects), None, None
