"""Stage 3, output distribution: send each sender's rows of the lookup back to it.

::

    pooled    owner: [W*B_max, D'] (senders stacked)  --pooled_send_buffer-->  flat, per sender
              rank s receives [B_s, D'] from each owner; a row-split table's partial sums are
              added up there, and divide_mean_bags turns SUMs into MEANs: (F, B, L) -> (B, D)
    sequence  owner: per key, one row per id          --sequence_send_buffer--> flat, per sender
              rank s puts each id's row back in place: sequence_output -> JaggedTensor (B, L, D)

The collectives are ``shardrec.distributed.comm``'s (``all_to_all_single``,
``reduce_scatter_rows``), called with ``differentiable=True``: every rank takes part in the
backward exchange, also one that looked nothing up (:func:`nothing_to_send`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardrec.distributed.sharding.input_dist import StackedInput
from shardrec.distributed.sharding.module_view import TableFeature
from shardrec.distributed.sharding.variable_batch import Rect, pack_rects
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from shardrec.sparse._vbe import gather_rows
from shardrec.sparse.variable_batch import expand_pooled

__all__ = [
    "divide_mean_bags",
    "nothing_to_send",
    "pooled_output",
    "pooled_send_buffer",
    "sequence_output",
    "sequence_send_buffer",
]


def pooled_send_buffer(
    out: torch.Tensor, stacked: StackedInput, widths: Sequence[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """The rows of the stacked output ``[W*B_max, D']`` that go back to each sender, flat
    (rank s's ``B_s`` rows, then rank s+1's...), and their sizes in elements.

    A sender that sent its keys' strides (``stacked.strides[s]``) gets its rows at each key's
    own stride: key by key, ``strides[s][f]`` rows of key ``f``'s columns (``widths[f]`` wide,
    in ``out``'s column order), as ``variable_batch.pad_received`` reads them; the others get
    their plain block."""
    if stacked.strides is not None:
        if widths is None:
            raise ValueError(
                "pooled_send_buffer: a sender sent its keys' strides; give each key's widths"
            )
        return _per_key_send_buffer(out, stacked, stacked.strides, widths)
    width = out.shape[1] if out.dim() == 2 else 0
    sizes = [b * width for b in stacked.batches]
    if all(b == stacked.batch for b in stacked.batches):
        return out.reshape(-1), sizes
    cuts: list[int] = []
    for b in stacked.batches:
        cuts.extend((b, stacked.batch - b))
    parts = torch.split(out, cuts)
    return torch.cat([p.reshape(-1) for p in parts[0::2]]), sizes


def _per_key_send_buffer(
    out: torch.Tensor,
    stacked: StackedInput,
    strides: Sequence[Sequence[int] | None],
    widths: Sequence[int],
) -> tuple[torch.Tensor, list[int]]:
    if len(widths) != len(stacked.length_per_feature) or sum(widths) != out.shape[1]:
        raise ValueError(
            f"pooled_send_buffer: widths {list(widths)} do not cut the output's"
            f" {out.shape[1]} columns into its {len(stacked.length_per_feature)} keys"
        )
    total = out.shape[1]
    rects: list[Rect] = []
    sizes: list[int] = []
    for s, per_key in enumerate(strides):
        start = s * stacked.batch * total
        if per_key is None:
            rects.append(Rect(start, stacked.batches[s], total, total))
            sizes.append(stacked.batches[s] * total)
            continue
        col = 0
        for n, w in zip(per_key, widths, strict=True):
            rects.append(Rect(start + col, n, w, total))
            col += w
        sizes.append(sum(n * w for n, w in zip(per_key, widths, strict=True)))
    return pack_rects(out.reshape(-1), rects), sizes


def nothing_to_send(device: torch.device, received_weights: torch.Tensor | None) -> torch.Tensor:
    """The (empty) pooled send buffer of a rank that looked nothing up.

    When the per-id weights it received require grad, the buffer is an empty slice of them: their
    gradient is then zeros and the rank enters the weights' backward all-to-all like its peers,
    which would otherwise wait for it.
    """
    if received_weights is not None and received_weights.requires_grad:
        return received_weights[:0].to(torch.float32)
    return torch.zeros(0, device=device)


def sequence_send_buffer(
    rows: list[torch.Tensor], stacked: StackedInput
) -> tuple[torch.Tensor, list[int]]:
    """Per sender, its ids' rows key by key, flat; and the sizes per sender in elements.
    ``rows[f]``: ``[ids of key f from every sender, width]`` (a sequence lookup's output)."""
    world = len(stacked.batches)
    chunks = [
        torch.split(r, [stacked.seg_len[s][f] for s in range(world)]) for f, r in enumerate(rows)
    ]
    per_sender = [[chunks[f][s].reshape(-1) for f in range(len(rows))] for s in range(world)]
    sizes = [sum(int(c.numel()) for c in cs) for cs in per_sender]
    flat = [c for cs in per_sender for c in cs]
    return (torch.cat(flat) if flat else stacked.values.new_zeros(0, dtype=torch.float32)), sizes


def pooled_output(
    pairs: Sequence[TableFeature], values: torch.Tensor, routed: KeyedJaggedTensor
) -> KeyedTensor:
    """The pooled output ``(B, sum of dims)`` of a sharded module, keyed by its pairs' names.

    A routed batch that carries inverse indices (a variable batch per key, routed as its unique
    samples: see ``FeatureRouter.route``) was pooled once per unique sample, and those smaller
    rows came back; here, on the rank that sent the batch, they are expanded to the full batch.
    """
    dims = [p.dim for p in pairs]
    values = expand_pooled(values, dims, [p.source for p in pairs], routed)
    return KeyedTensor(keys=[p.name for p in pairs], length_per_key=dims, values=values)


def sequence_output(
    values: torch.Tensor, routed: KeyedJaggedTensor, index: int, need_indices: bool
) -> JaggedTensor:
    """An EmbeddingCollection output for key ``index`` of ``routed``: ``values`` ``[ids, D]``
    with the key's lengths ``[B]``.

    A routed batch that carries inverse indices (a variable batch per key, routed as its unique
    samples) comes back at the full batch, as TorchRec's sharded collection gives it: sample
    ``b`` holds the rows of the unique sample it reads, so the output is the one of the batch
    sent whole. With ``need_indices`` the ids ride in the weights slot (TorchRec's convention, as
    the unsharded collection does).
    """
    batch = routed.stride()
    lengths = routed.lengths()[index * batch : (index + 1) * batch]
    ids: torch.Tensor | None = None
    if need_indices:
        per_key = routed.offset_per_key()
        ids = routed.values()[per_key[index] : per_key[index + 1]]
    inverse = routed.inverse_indices_or_none()
    if inverse is not None:
        values, ids, lengths = expand_sequence(values, ids, lengths, routed.keys()[index], inverse)
    if ids is None:
        return JaggedTensor(values=values, lengths=lengths)
    return JaggedTensor(values=values, weights=ids, lengths=lengths)


def expand_sequence(
    values: torch.Tensor,
    ids: torch.Tensor | None,
    lengths: torch.Tensor,
    key: str,
    inverse: tuple[list[str], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One key's rows ``[ids, D]`` (and ids) of its unique samples ``lengths`` to the full batch
    (the inverse table's width): sample ``b`` reads the unique sample ``table[key, b]``.
    Differentiable: a unique sample's gradient is the sum over the samples that read it. A key
    without inverse indices has the full batch first (a padded batch's other samples are
    empty)."""
    names, table = inverse
    width = table.shape[1]
    if key not in names:
        return values, ids, lengths[:width]
    rows = table[names.index(key)].to(device=lengths.device, dtype=torch.long)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths.long(), 0, out=offsets[1:])
    values, ids, picked = gather_rows(values, ids, lengths.long(), offsets, rows)
    return values, ids, picked.to(lengths.dtype)


def divide_mean_bags(
    values: torch.Tensor, lengths: torch.Tensor, dims: Sequence[int], means: Sequence[bool]
) -> torch.Tensor:
    """Pooled SUMs ``[B, sum(dims)]`` -> MEANs for the keys flagged in ``means`` (an empty bag
    stays zero). ``lengths`` is ``[keys, B]``: the bag sizes of the routed batch."""
    lengths = lengths.to(values.dtype)
    scale = torch.where(lengths > 0, 1.0 / lengths.clamp(min=1), torch.zeros_like(lengths))
    flags = torch.tensor(list(means), device=values.device).unsqueeze(1)
    scale = torch.where(flags, scale, 1.0)
    per_col = torch.repeat_interleave(scale, torch.tensor(list(dims), device=values.device), dim=0)
    return values * per_col.t()
