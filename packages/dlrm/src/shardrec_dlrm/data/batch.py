"""The training batch: dense features, the 26 categorical features as a KeyedJaggedTensor,
labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .schema import NUM_SPARSE, SPARSE_KEYS, Rows, hash_ids

if TYPE_CHECKING:
    import torch

    from shardrec import KeyedJaggedTensor


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch of B rows, TorchRec's ``Batch`` shape.

    - ``dense_features``: float32 ``[B, 13]``, already transformed (log(1 + max(x, 0))).
    - ``sparse_features``: ``KeyedJaggedTensor`` with keys ``cat_0`` .. ``cat_25``, one id per key
      and row (all lengths 1, int32), values int64 table rows (row 0 = missing), key-major::

          values = [cat_0 of rows 0..B-1, cat_1 of rows 0..B-1, ..., cat_25 of rows 0..B-1]

    - ``labels``: float32 ``[B]`` of 0/1.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            self.dense_features.to(device, non_blocking=non_blocking),
            self.sparse_features.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """The same batch in page-locked host memory, so that a copy to a GPU can overlap work."""
        return Batch(
            self.dense_features.pin_memory(),
            self.sparse_features.pin_memory(),
            self.labels.pin_memory(),
        )

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Mark this batch's tensors as used on ``stream``: the training pipeline copies a batch
        that can do this on a side stream, and its memory must not be reused before ``stream``
        has read it."""
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)


def make_batch(rows: Rows, num_embeddings_per_feature: Sequence[int] | None) -> Batch:
    """Build a :class:`Batch` from rows (copies out of memory maps; hashes ids to table rows)."""
    import torch

    from shardrec import KeyedJaggedTensor

    b = len(rows)
    ids = hash_ids(np.asarray(rows.sparse), num_embeddings_per_feature)
    values = torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1))
    kjt = KeyedJaggedTensor(
        keys=list(SPARSE_KEYS),
        values=values,
        # numpy's fill, not torch.ones: torch fills large tensors on its thread pool, which costs
        # more than the fill itself on a busy machine
        lengths=torch.from_numpy(np.ones(NUM_SPARSE * b, dtype=np.int32)),
        stride=b,
    )
    dense = torch.from_numpy(np.array(rows.dense, dtype=np.float32, copy=True))
    labels = torch.from_numpy(np.asarray(rows.labels, dtype=np.float32))
    return Batch(dense, kjt, labels)
