"""Admission of new ids into a managed table: an id gets a row once it has been seen often enough.

:class:`CountThresholdAdmission` counts the ids that have no row in a count-min sketch (``depth``
rows of ``width`` int32 counters, one hash per row; an id's count is the smallest of its
counters). A sketch never under-counts, so an id is never kept out longer than its threshold; two
ids that share all their counters may be admitted early (the sketch's false positives, rarer as
``width`` grows). The counters are a buffer of the table's module, so they are checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import torch
from torch import nn

from shardrec.modules.mc_id_map import hash_slots
from shardrec.modules.mc_policies import require_int

__all__ = ["CountMinSketch", "CountThresholdAdmission"]

# Odd 64-bit multipliers (as int64), one per sketch row; distinct from the id map's.
_MULTIPLIERS: Final = (
    -4658895280553007687,
    -7723592293110705685,
    -3335678366873096957,
    7046029254386353131,
)


@dataclass(frozen=True, slots=True)
class CountThresholdAdmission:
    """Admit an id into the table on the training lookup that brings its count to ``threshold``.

    Until then the id reads the table's default row. ``width`` is the number of counters per
    sketch row (rounded up to a power of two; default: 4 per table row, at least 1024) and
    ``depth`` the number of rows (1 to 4).
    """

    threshold: int
    width: int | None = None
    depth: int = 2

    def __post_init__(self) -> None:
        require_int(self.threshold, 1, "CountThresholdAdmission: threshold")
        if self.width is not None:
            require_int(self.width, 1, "CountThresholdAdmission: width")
        if not 1 <= self.depth <= len(_MULTIPLIERS):
            raise ValueError(
                f"CountThresholdAdmission: depth must be 1 to {len(_MULTIPLIERS)}, got {self.depth}"
            )

    def sketch_bits(self, capacity: int) -> int:
        """log2 of the sketch width for a table of ``capacity`` rows."""
        width = self.width if self.width is not None else max(1024, 4 * capacity)
        return max(1, (width - 1).bit_length())


class CountMinSketch(nn.Module):
    """``depth`` × ``2**bits`` int32 counters; :meth:`add` counts ids and returns their counts."""

    counters: torch.Tensor

    def __init__(self, bits: int, depth: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer(
            "counters", torch.zeros(depth, 1 << bits, dtype=torch.int32, device=device)
        )

    def add(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add ``counts[i]`` to id ``ids[i]`` (distinct ids); return each id's count after that."""
        width = 1 << self.bits
        cells = torch.stack(
            [
                hash_slots(ids, self.bits, _MULTIPLIERS[d]) + d * width
                for d in range(self.counters.shape[0])
            ]
        )
        flat = self.counters.view(-1)
        add = counts.to(torch.int32).expand(cells.shape[0], -1).reshape(-1)
        flat.index_add_(0, cells.reshape(-1), add)
        return flat.index_select(0, cells.reshape(-1)).view(cells.shape).amin(dim=0)

    def extra_repr(self) -> str:
        return f"depth={self.counters.shape[0]}, width={1 << self.bits}"
