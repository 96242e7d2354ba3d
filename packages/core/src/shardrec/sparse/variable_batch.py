"""Variable batch per key: deduplicate a batch's repeated samples per key, and expand them back.

A batch of (user, item) pairs repeats each user's features once per item. ::

    full batch, stride 4            deduplicate_features(kjt, ["user"])
             s0     s1     s2     s3
    user     [7, 8] [7, 8] [9]    [9]      user  [7, 8] [9]         stride_per_key 2
    item     [1]    [2]    [3]    [4]      item  [1] [2] [3] [4]    stride_per_key 4
                                           inverse_indices: user [0, 0, 1, 1]
                                                            item [0, 1, 2, 3]

An ``EmbeddingBagCollection`` pools each key's unique samples once and expands the pooled rows to
the full batch through the inverse indices: the same output, gradients and updates as the full
batch, with fewer ids to look up (and, under ``DistributedModelParallel``, to send).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import torch

from shardrec.sparse import _vbe as vbe
from shardrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor

__all__ = ["deduplicate_features", "expand_features", "expand_pooled", "pad_to_max_stride"]

_OWNER = "deduplicate_features"


def deduplicate_features(
    kjt: KeyedJaggedTensor, keys: Sequence[str] | None = None
) -> KeyedJaggedTensor:
    """A variable-batch KJT holding each of ``keys``' distinct samples once (default: every key).

    Two samples of a key are the same when their ids (and weights, if any) are equal in order.
    Each key keeps its distinct samples in order of first appearance; the other keys keep all
    their samples. The result has ``stride_per_key_per_rank`` ``[[distinct samples]]`` per key,
    ``inverse_indices`` ``(kjt.keys(), table)`` with ``table[k, b]`` the row that sample ``b``
    of key ``k`` became, and ``stride()`` the full batch size. Reads the ids (a device sync).
    """
    if kjt.variable_stride_per_key():
        raise ValueError(f"{_OWNER}: the KJT already has a variable batch per key")
    all_keys = kjt.keys()
    chosen = set(all_keys if keys is None else keys)
    unknown = sorted(chosen - set(all_keys))
    if unknown:
        raise ValueError(f"{_OWNER}: keys {unknown} are not in the KJT (keys: {all_keys})")
    values, weights = kjt.values(), kjt.weights_or_none()
    if values.dim() != 1 or values.is_floating_point() or values.is_complex():
        raise TypeError(
            f"{_OWNER}: values must be 1-D integer ids, got {values.dtype} {tuple(values.shape)}"
        )
    num_keys, batch = len(all_keys), kjt.stride()
    device = values.device
    if num_keys == 0 or batch == 0:
        return _with_rows(kjt, torch.zeros(num_keys, batch, dtype=torch.long, device=device))
    lengths = kjt.lengths().long()
    # One row per (key, sample): key, sample (-1 where that key is deduplicated, so equal
    # samples collide), length, then the padded ids and weight bits. One torch.unique over all.
    samples = torch.arange(num_keys * batch, device=device)
    dedup = torch.tensor([k in chosen for k in all_keys], device=device).repeat_interleave(batch)
    columns = [
        samples // batch,
        torch.where(dedup, -1, samples % batch),
        lengths,
        _padded(values.long(), lengths),
    ]
    if weights is not None:
        columns.append(_padded(_bits(weights), lengths))
    table = torch.cat([c if c.dim() == 2 else c.unsqueeze(1) for c in columns], dim=1)
    inverse, first = _unique_rows(table)
    num_unique = first.numel()
    # Order the distinct samples by first appearance: positions are key-major, so each key's
    # samples stay together and in the order the batch had them.
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_unique, device=device)
    kept = first.index_select(0, order)
    counts: list[int] = torch.bincount(kept // batch, minlength=num_keys).tolist()
    base = torch.tensor(vbe.lengths_offsets(counts)[:-1], device=device)
    rows = rank.index_select(0, inverse).view(num_keys, batch) - base.unsqueeze(1)
    new_values, new_weights, new_lengths = vbe.gather_rows(
        values, weights, lengths, kjt.offsets(), kept
    )
    return KeyedJaggedTensor.from_lengths_sync(
        all_keys,
        new_values,
        new_lengths.to(kjt.lengths().dtype),
        weights=new_weights,
        stride=batch,
        stride_per_key_per_rank=[[c] for c in counts],
        inverse_indices=(list(all_keys), rows),
    )


def expand_features(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The full batch a variable-batch KJT stands for: every key with ``stride()`` samples, each
    read through the inverse indices (a key without inverse indices must already have
    ``stride()`` samples). A KJT without a variable batch is returned as is."""
    if not kjt.variable_stride_per_key():
        return kjt
    batch = kjt.stride()
    flat = flat_sample_index(kjt, "expand_features")
    values, weights, lengths = vbe.gather_rows(
        kjt.values(), kjt.weights_or_none(), kjt.lengths().long(), kjt.offsets(), flat
    )
    return KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(),
        values,
        lengths.to(kjt.lengths().dtype),
        weights=weights,
        stride=batch,
    )


def pad_to_max_stride(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The unique samples of a variable-batch KJT as a plain batch that any lookup can take:
    every key gets as many samples as the key with the most, the missing ones empty, at the end of
    each key. Values and weights are shared, not copied. The result keeps ``kjt``'s inverse
    indices (TorchRec's meaning of a KJT that has them: pool its samples, then expand), which
    :func:`expand_pooled` applies to the pooled rows.

    ::

        user   [7, 8]  [9]                    user   [7, 8]  [9]  []   []
        item   [1]     [2]    [3]    [4, 5]    item   [1]     [2]  [3]  [4, 5]   stride 4

    Every key must have inverse indices or the full batch of samples (ValueError naming it).
    A KJT without a variable batch is returned as is.
    """
    if not kjt.variable_stride_per_key():
        return kjt
    inverse_rows(kjt, "pad_to_max_stride")  # refuses keys that could not be expanded
    strides = kjt.stride_per_key()
    longest = max(strides, default=0)
    lengths = kjt.lengths()
    if min(strides, default=0) != longest:
        positions = [k * longest + j for k, n in enumerate(strides) for j in range(n)]
        index = torch.tensor(positions, dtype=torch.long, device=lengths.device)
        lengths = lengths.new_zeros(len(strides) * longest).index_copy_(0, index, lengths)
    # Trusted: a routed KJT may repeat a key (a feature read by two tables).
    return KeyedJaggedTensor._trusted(
        kjt.keys(),
        None,
        kjt.values(),
        kjt.weights_or_none(),
        lengths,
        None,
        longest,
        kjt.length_per_key(),
        kjt.offset_per_key(),
        None,
        kjt.inverse_indices_or_none(),
    )


def expand_pooled(
    pooled: torch.Tensor, dims: Sequence[int], sources: Sequence[str], kjt: KeyedJaggedTensor
) -> torch.Tensor:
    """Pooled rows ``(samples, sum(dims))`` of a batch that carries inverse indices (for example
    from :func:`pad_to_max_stride`) to the full batch ``(inverse width, sum(dims))``: column block
    ``i`` (``dims[i]`` wide, read from key ``sources[i]``) takes its rows through that key's
    inverse indices; a key without them keeps its rows. Differentiable: a unique sample's
    gradient is the sum over the samples that read it. Without inverse indices, ``pooled``."""
    if kjt.variable_stride_per_key():
        raise ValueError("expand_pooled: pool the batch of pad_to_max_stride(kjt), not kjt")
    inverse = kjt.inverse_indices_or_none()
    if inverse is None:
        return pooled
    names, table = inverse
    at = {name: i for i, name in enumerate(names)}
    table = table.to(device=pooled.device, dtype=torch.long)
    keep = [s for s in sources if s not in at]
    if keep and pooled.shape[0] != table.shape[1]:
        raise ValueError(
            f"expand_pooled: keys {sorted(set(keep))} have no inverse indices and "
            f"{pooled.shape[0]} pooled rows, not the batch of {table.shape[1]}"
        )
    blocks = torch.split(pooled, list(dims), dim=1)
    return torch.cat(
        [
            block if source not in at else block.index_select(0, table[at[source]])
            for block, source in zip(blocks, sources, strict=True)
        ],
        dim=1,
    )


def flat_sample_index(kjt: KeyedJaggedTensor, owner: str) -> torch.Tensor:
    """For each key and each sample of the full batch, the index into ``kjt.lengths()`` of the
    row it reads: ``(len(keys) * stride(),)``, key-major."""
    rows = inverse_rows(kjt, owner)
    starts = torch.tensor(kjt.lengths_offset_per_key()[:-1], device=rows.device)
    return (rows + starts.unsqueeze(1)).view(-1)


def inverse_rows(kjt: KeyedJaggedTensor, owner: str) -> torch.Tensor:
    """``(len(keys), stride())``: the row of each key that each sample reads. A key without
    inverse indices must have ``stride()`` samples (its rows are the samples themselves)."""
    batch = kjt.stride()
    device = kjt.values().device
    inverse = kjt.inverse_indices_or_none()
    at = {} if inverse is None else {name: i for i, name in enumerate(inverse[0])}
    missing = [
        key
        for key, stride in zip(kjt.keys(), kjt.stride_per_key(), strict=True)
        if key not in at and stride != batch
    ]
    if missing:
        raise ValueError(
            f"{owner}: keys {missing} have fewer samples than the batch of {batch} and no "
            "inverse indices to expand them with; give inverse_indices=(keys, table)"
        )
    if inverse is not None and inverse[1].shape[1] != batch:
        raise ValueError(
            f"{owner}: inverse_indices cover {inverse[1].shape[1]} samples but stride() is {batch}"
        )
    picks = [at.get(key, -1) for key in kjt.keys()]  # noqa: SIM118
    identity = torch.arange(batch, device=device)
    if inverse is None:
        return identity.expand(len(picks), batch)
    table = inverse[1].to(device=device, dtype=torch.long)
    if -1 not in picks:
        if picks == list(range(table.shape[0])):
            return table
        return table.index_select(0, torch.tensor(picks, device=device))
    return torch.stack([identity if p < 0 else table[p] for p in picks])


def _with_rows(kjt: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
    """``kjt`` with every sample kept, as a variable-batch KJT (the empty cases)."""
    return KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(),
        kjt.values(),
        kjt.lengths(),
        weights=kjt.weights_or_none(),
        stride=kjt.stride(),
        stride_per_key_per_rank=[[n] for n in kjt.stride_per_key()],
        inverse_indices=(list(kjt.keys()), rows),
    )


_MIX: Final = -7046029254386353131  # 0x9E3779B97F4A7C15 as an int64: an odd, well-mixed multiplier


def _unique_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``table`` the index of its distinct row, and each distinct row's first
    position. Rows are hashed to one int64 each and the hashes made unique (``torch.unique`` of
    rows compares them one pair at a time on CPU: ~100x slower); then every row is compared with
    the first row of its hash, and a collision falls back to the exact row-wise unique."""
    hashes = torch.zeros(table.shape[0], dtype=torch.int64, device=table.device)
    for column in table.unbind(1):
        hashes = hashes * _MIX + column
        hashes = hashes ^ (hashes >> 29)
    _, inverse = torch.unique(hashes, return_inverse=True)
    first = _first_positions(inverse)
    if not torch.equal(table.index_select(0, first.index_select(0, inverse)), table):
        _, inverse = torch.unique(table, dim=0, return_inverse=True)
        first = _first_positions(inverse)
    return inverse, first


def _first_positions(inverse: torch.Tensor) -> torch.Tensor:
    count = int(inverse.max()) + 1 if inverse.numel() else 0
    positions = torch.arange(inverse.numel(), device=inverse.device)
    return torch.full((count,), inverse.numel(), device=inverse.device).scatter_reduce(
        0, inverse, positions, "amin"
    )


def _padded(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(rows, longest)`` int64: each row's entries, zero after its end (the length, in its own
    column, tells a padding zero from an id 0)."""
    longest = int(lengths.max()) if lengths.numel() else 0
    out = flat.new_zeros(lengths.numel(), longest)
    if flat.numel():
        row = torch.repeat_interleave(torch.arange(lengths.numel(), device=flat.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        out[row, torch.arange(flat.numel(), device=flat.device) - starts.index_select(0, row)] = (
            flat
        )
    return out


def _bits(weights: torch.Tensor) -> torch.Tensor:
    """Weights as int64 holding their bit patterns, so that equal weights compare equal."""
    if weights.dim() != 1:
        raise TypeError(f"{_OWNER}: weights must be 1-D, got shape {tuple(weights.shape)}")
    if not weights.is_floating_point():
        return weights.long()
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[weights.element_size()]
    return weights.contiguous().view(as_int).long()
