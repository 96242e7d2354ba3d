"""A global batch of every rank's samples, and each rank's slice of it.

A sharded run feeds rank ``r`` the samples ``sizes[0] + ... + sizes[r-1]`` onwards (``sizes[r]`` of
them); the unsharded reference reads all of them at once. Entries are stored key-major, as in a
KJT::

              sample:  0 1 2 | 3 4        (sizes = [3, 2]: rank 0 | rank 1)
    lengths   "f0"     1 0 2 | 1 1
              "f1"     0 1 1 | 2 0
    ids       "f0" -> [a  b c | d  e]     "f1" -> [f g | h i]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from shardrec.sparse import KeyedJaggedTensor

__all__ = ["Batches", "GlobalBatch"]


@dataclass(frozen=True, slots=True)
class GlobalBatch:
    """``lengths`` is ``[len(keys), sum(sizes)]``; ``ids[k]`` (and ``weights[k]``) hold feature
    ``k``'s entries in sample order; ``sizes[r]`` is rank ``r``'s number of samples."""

    keys: list[str]
    lengths: torch.Tensor
    ids: list[torch.Tensor]
    weights: list[torch.Tensor] | None
    sizes: list[int]

    @classmethod
    def random(
        cls,
        rows: Mapping[str, int],
        sizes: Sequence[int],
        *,
        seed: int,
        weighted: bool = False,
        max_length: int | Mapping[str, int] = 3,
    ) -> GlobalBatch:
        """Random ids below ``rows[key]`` for each key (in ``rows``' order), 0 to ``max_length``
        of them per sample and feature (a mapping: per key, 3 for a key it does not name);
        weights in [0.5, 1.5) when ``weighted``. The same numbers for the same arguments, in
        every process."""
        g = torch.Generator().manual_seed(seed)
        keys = list(rows)
        if isinstance(max_length, int):
            lengths = torch.randint(0, max_length + 1, (len(keys), sum(sizes)), generator=g)
        else:
            lengths = torch.stack(
                [
                    torch.randint(0, max_length.get(key, 3) + 1, (sum(sizes),), generator=g)
                    for key in keys
                ]
            )
        ids = [
            torch.randint(0, rows[key], (int(lengths[k].sum()),), generator=g)
            for k, key in enumerate(keys)
        ]
        weights = None
        if weighted:
            weights = [
                torch.rand(int(lengths[k].sum()), generator=g) + 0.5 for k in range(len(keys))
            ]
        return cls(keys, lengths, ids, weights, list(sizes))

    def check(self, rows: Mapping[str, int], *, weighted: bool, where: str) -> None:
        """Raise ValueError (starting with ``where``) unless this batch fits a model whose
        features are ``rows`` (feature -> its table's rows) and ``weighted`` or not: every
        feature once, lengths ``[keys, samples]`` of counts >= 0, as many ids (and weights) as
        the lengths say, ids in ``[0, rows)``."""
        if any(n < 0 for n in self.sizes):
            raise ValueError(f"{where}: sizes {self.sizes} has a negative number of samples")
        missing = sorted(set(rows) - set(self.keys))
        unknown = sorted(set(self.keys) - set(rows))
        if missing or unknown or len(set(self.keys)) != len(self.keys):
            raise ValueError(
                f"{where}: keys {self.keys} must name each of the model's features once"
                f" (missing {missing}, unknown {unknown})"
            )
        shape = (len(self.keys), sum(self.sizes))
        if tuple(self.lengths.shape) != shape or bool((self.lengths < 0).any()):
            raise ValueError(
                f"{where}: lengths must be {list(shape)} (keys x samples) of counts >= 0,"
                f" got shape {list(self.lengths.shape)}"
            )
        if (self.weights is not None) != weighted:
            need = "needs" if weighted else "takes no"
            raise ValueError(f"{where}: the model {need} per-id weights")
        entries = {"ids": self.ids}
        if self.weights is not None:
            entries["weights"] = self.weights
        for what, per_key in entries.items():
            if len(per_key) != len(self.keys):
                raise ValueError(f"{where}: {len(per_key)} {what} tensors, {len(self.keys)} keys")
        for k, key in enumerate(self.keys):
            count = int(self.lengths[k].sum())
            for what, per_key in entries.items():
                if per_key[k].numel() != count:
                    raise ValueError(
                        f"{where}: feature {key!r} has {per_key[k].numel()} {what};"
                        f" its lengths say {count}"
                    )
            ids = self.ids[k]
            if count and not 0 <= int(ids.min()) <= int(ids.max()) < rows[key]:
                raise ValueError(
                    f"{where}: feature {key!r} has ids {int(ids.min())}..{int(ids.max())};"
                    f" its table has {rows[key]} rows"
                )

    def bounds(self, rank: int | None) -> tuple[int, int]:
        """Rank ``rank``'s samples ``[lo, hi)`` (every sample for None)."""
        if rank is None:
            return 0, sum(self.sizes)
        lo = sum(self.sizes[:rank])
        return lo, lo + self.sizes[rank]

    def entries(self, per_key: Sequence[torch.Tensor], rank: int | None) -> torch.Tensor:
        """Rank ``rank``'s entries of ``per_key`` (ids, weights, or a gradient of the weights laid
        out like them), key-major, as its KJT holds them."""
        lo, hi = self.bounds(rank)
        parts = []
        for k, entries in enumerate(per_key):
            first = int(self.lengths[k, :lo].sum())
            parts.append(entries[first : first + int(self.lengths[k, lo:hi].sum())])
        return torch.cat(parts)

    def kjt(self, rank: int | None = None, *, weights_need_grad: bool = False) -> KeyedJaggedTensor:
        """Rank ``rank``'s KJT (the whole batch for None)."""
        lo, hi = self.bounds(rank)
        weights = None
        if self.weights is not None:
            weights = self.entries(self.weights, rank).requires_grad_(weights_need_grad)
        return KeyedJaggedTensor(
            keys=list(self.keys),
            values=self.entries(self.ids, rank),
            lengths=self.lengths[:, lo:hi].reshape(-1),
            weights=weights,
        )

    def rows_by_rank(
        self, rows: torch.Tensor, features: Sequence[str] | None = None
    ) -> list[torch.Tensor]:
        """An unsharded module's output ``rows`` for this whole batch, cut into each rank's part.

        ``features`` None: pooled rows, one per sample (an EmbeddingBagCollection). Otherwise
        ``rows`` is a block per entry of ``features`` (an EmbeddingCollection's outputs, a
        feature's ids in sample order each): a rank gets its samples' ids of every block.
        """
        if features is None:
            return list(torch.split(rows, self.sizes))
        per_key = dict(zip(self.keys, (int(n) for n in self.lengths.sum(dim=1)), strict=True))
        blocks = torch.split(rows, [per_key[f] for f in features])
        out = []
        for rank in range(len(self.sizes)):
            lo, hi = self.bounds(rank)
            parts = []
            for f, block in zip(features, blocks, strict=True):
                lengths = self.lengths[self.keys.index(f)]
                first = int(lengths[:lo].sum())
                parts.append(block[first : first + int(lengths[lo:hi].sum())])
            out.append(torch.cat(parts))
        return out

    def split_by_key(self, values: torch.Tensor) -> list[torch.Tensor]:
        """A whole-batch per-entry tensor (the global KJT's weights' gradient) cut by key."""
        return list(torch.split(values, [int(n) for n in self.lengths.sum(dim=1)]))


Batches = Callable[[int, int], GlobalBatch]
"""``(step, world size) -> GlobalBatch``: a check's batch of that step, one ``sizes`` entry per
rank (the step after the last training step is the batch a loaded checkpoint is run on)."""
