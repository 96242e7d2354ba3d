"""The save planner shardrec gives DCP: it hands the writer each tensor without a copy.

A table's weights and fused optimizer state are views into a lookup's storage, which holds every
table of the lookup. DCP's file writer copies any tensor whose storage is larger than the tensor
(``torch.save`` would write the whole storage), and keeps every tensor of a file alive until the
file is written: the whole state, a second time, at the peak of every save. This planner hands it
instead a tensor whose storage is exactly the view's bytes, sharing the memory (a storage slice
keeps the lookup's storage alive), so nothing is copied and the bytes written are the same.
"""

from __future__ import annotations

import io

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem


def exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with a storage of exactly its own bytes, sharing its memory; a tensor that is
    not contiguous (its bytes are not one range) is returned as it is."""
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    storage = tensor.untyped_storage()[start : start + tensor.nbytes]
    out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return out.set_(storage, 0, tensor.shape, tensor.stride())


class ExactStorageSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, except that each tensor to write comes as
    :func:`exact_storage` of it."""

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        data = super().resolve_data(write_item)
        return exact_storage(data.detach()) if isinstance(data, torch.Tensor) else data
