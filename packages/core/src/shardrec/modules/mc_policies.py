"""Eviction policies of a managed table: which rows give way, and when.

Each managed table keeps, per row, the training step that last read it and how many times it was
read since its id took it. A policy reads those two numbers:

- :class:`LRU_EvictionPolicy`: when admitted ids find no free row, the rows read least recently
  give way.
- :class:`LFU_EvictionPolicy`: when admitted ids find no free row, the rows read least often
  (since their id took them) give way.
- :class:`TTL_EvictionPolicy`: a row not read for more than ``ttl`` steps is freed; newcomers only
  ever take free rows.

Ties go to the lower row number, so an eviction is a pure function of the module's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "EvictionPolicy",
    "LFU_EvictionPolicy",
    "LRU_EvictionPolicy",
    "TTL_EvictionPolicy",
    "require_int",
]


def require_int(value: object, minimum: int, what: str) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


@runtime_checkable
class EvictionPolicy(Protocol):
    """What a managed table asks its policy at each eviction run."""

    @property
    def makes_room(self) -> bool:
        """True: rows give way, lowest :meth:`score` first, when admitted ids find no free row."""
        ...

    @property
    def counts_reads(self) -> bool:
        """True: :meth:`score` reads the per-row read counts (only then kept up to date)."""
        ...

    def score(self, last_read: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """Per row, an int64 >= 0: lower scores give way first."""
        ...

    def expired(self, last_read: torch.Tensor, step: int) -> torch.Tensor | None:
        """Per row, True where the row is freed at this run whatever the demand (None: none)."""
        ...


@dataclass(frozen=True, slots=True)
class LRU_EvictionPolicy:
    """Least recently used: the rows whose last read is oldest give way to new ids."""

    @property
    def makes_room(self) -> bool:
        return True

    @property
    def counts_reads(self) -> bool:
        return False

    def score(self, last_read: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        return last_read

    def expired(self, last_read: torch.Tensor, step: int) -> torch.Tensor | None:
        return None


@dataclass(frozen=True, slots=True)
class LFU_EvictionPolicy:
    """Least frequently used: the rows read fewest times (since their id took them) give way.

    A row's count starts at the number of times its id appeared in the batch that admitted it.
    Under a drifting id distribution, long-held rows keep high counts; prefer LRU or TTL there.
    """

    @property
    def makes_room(self) -> bool:
        return True

    @property
    def counts_reads(self) -> bool:
        return True

    def score(self, last_read: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        return reads

    def expired(self, last_read: torch.Tensor, step: int) -> torch.Tensor | None:
        return None


@dataclass(frozen=True, slots=True)
class TTL_EvictionPolicy:
    """Time to live: a row not read for more than ``ttl`` training steps is freed at the next
    eviction run. New ids take free rows only; when none is free they read the default row (and
    count as rejected) until rows expire."""

    ttl: int

    def __post_init__(self) -> None:
        require_int(self.ttl, 1, "TTL_EvictionPolicy: ttl (steps)")

    @property
    def makes_room(self) -> bool:
        return False

    @property
    def counts_reads(self) -> bool:
        return False

    def score(self, last_read: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        return last_read

    def expired(self, last_read: torch.Tensor, step: int) -> torch.Tensor | None:
        return last_read < step - self.ttl
