"""Shared by the kernel tests: random weighted batches with empty bags, and a bag-by-bag
reference of pooling written in plain torch (differentiable, one leaf tensor per table)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardrec import KeyedJaggedTensor
from shardrec.kernels import PoolingType


def random_kjt(
    keys: Sequence[str], rows: Sequence[int], batch: int, seed: int = 0, *, max_len: int = 3
) -> KeyedJaggedTensor:
    """Random ids with bag lengths 0..max_len (so some bags are empty) and random weights."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(keys) * batch,), generator=gen)
    values = []
    for f, n in enumerate(rows):
        count = int(lengths[f * batch : (f + 1) * batch].sum())
        values.append(torch.randint(0, n, (count,), generator=gen))
    total = int(lengths.sum())
    weights = torch.rand(total, generator=gen) + 0.5
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys), values=torch.cat(values), lengths=lengths, weights=weights
    )


def reference_pooled(
    kjt: KeyedJaggedTensor,
    tables: dict[str, torch.Tensor],
    features: Sequence[tuple[str, str, PoolingType]],
    weighted: bool,
) -> torch.Tensor:
    """Bag by bag: sum (or mean) of ``weight * row``; zeros for an empty bag."""
    blocks = []
    for name, table, pooling in features:
        jt = kjt[name]
        w = tables[table]
        offsets = jt.offsets().tolist()
        ids = jt.values()
        weights = jt.weights() if weighted else torch.ones(ids.numel())
        rows = []
        for b in range(len(offsets) - 1):
            lo, hi = offsets[b], offsets[b + 1]
            if hi == lo:
                rows.append(torch.zeros(w.shape[1], dtype=w.dtype))
                continue
            pooled = (w[ids[lo:hi]] * weights[lo:hi].unsqueeze(1)).sum(0)
            rows.append(pooled / (hi - lo) if pooling is PoolingType.MEAN else pooled)
        blocks.append(torch.stack(rows))
    return torch.cat(blocks, dim=1).float()
