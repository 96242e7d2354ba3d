"""The counters of a managed-id module: positions in its ``_counters`` buffer (int64).

One small tensor, so that a checkpoint, a move to another device or a sharded module's exchange
carries them all at once (the buffer's name and length are part of the state-dict format)::

    index   0      1         2        3         4       5      6
    name    STEP   ADMITTED  EVICTED  REJECTED  BELOW   FREE   DEMAND

:class:`~shardrec.modules.managed_collision.MCHManagedCollisionModule` updates them;
:func:`~shardrec.modules.mc_buckets.bucket_stats` sums them over a table's buckets. Plain ``int``
constants rather than an ``IntEnum``: the module's step reads them per call on a hot path.
"""

from __future__ import annotations

from typing import Final

import torch

__all__ = [
    "ADMITTED",
    "BELOW",
    "DEMAND",
    "EVICTED",
    "FREE",
    "NUM_COUNTERS",
    "REJECTED",
    "STEP",
    "empty_counters",
]

#: Training steps taken.
STEP: Final = 0
#: Ids given a row of their own, in total.
ADMITTED: Final = 1
#: Rows taken back from the ids holding them, in total.
EVICTED: Final = 2
#: Lookups of admitted ids that found the table full (they read the default row), in total.
REJECTED: Final = 3
#: Lookups of new ids still below the admission threshold, in total.
BELOW: Final = 4
#: Rows no id holds (the length of the free-row stack).
FREE: Final = 5
#: Ids admitted or rejected since the last eviction run.
DEMAND: Final = 6
#: Length of the buffer.
NUM_COUNTERS: Final = 7


def empty_counters(capacity: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The counters of an empty module of ``capacity`` rows: every row free, nothing counted."""
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device)
    counters[FREE] = capacity
    return counters
