"""``IdRowMap``: raw int64 ids to table rows, an open-addressing hash table held in tensors.

Layout (``S`` slots, a power of two at least twice the rows, so the table is at most half full)::

    slots             [S, 2] int64  per slot: the raw id stored there (any int64 value), and
                                    its row (-1 = empty slot, -2 = deleted slot, a tombstone)
    row_slots         [R] int64   the slot holding each row; -1 = the row is free
    max_displacement  []  int64   an upper bound of (slot - home slot) over the held ids

An id's home slot is the top bits of ``id × 2^64/φ`` (Fibonacci hashing); it is stored at the
first open slot from there on (linear probing). Since no held id sits further than
``max_displacement`` slots from home, a lookup reads the home slot of every id, then, for the few
ids not settled there, the next ``max_displacement`` slots at once: a fixed number of vectorised
calls whatever the batch, no loop over ids or probe steps (a loop of one probe step per call
measured about twice as slow here: each step is a dozen small torch calls). Removal leaves a
tombstone (so the bound stays valid) that inserts reuse; once tombstones fill a quarter of the
slots the map is rebuilt. All four tensors are buffers, so the map is saved and loaded with the
module's ``state_dict``.

A slot's id and row sit side by side (``slot_ids`` and ``slot_rows`` are strided views of
``slots``): a lookup's gathers hit random slots, and the row then comes from the cache line the
id was read from (two separate arrays cost a cache miss each, about 1.6x the time with the tables
out of cache).

On CPU, :meth:`IdRowMap.find` and :meth:`IdRowMap.insert` run compiled loops on views of the
buffers (:mod:`shardrec.modules.mc_id_map_host`) with the same results: a table's batch is a few
thousand ids, and there the fixed cost of a dozen vectorised calls was most of the time.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import torch
from torch import nn

from shardrec.modules.mc_id_map_host import (
    DELETED,
    EMPTY,
    INSERT_WINDOW,
    MULTIPLIER,
    HostKernels,
    host_kernels,
)

__all__ = ["IdRowMap", "hash_slots"]

# Ids left after a race that an insert places one slot read at a time (CPU).
_FEW: Final = 8
# Slots a lookup reads at once per id not settled at home: first a few, then up to 64 at a time.
_SHORT_WINDOW: Final = 4
_LOOKUP_WINDOW: Final = 64


def hash_slots(ids: torch.Tensor, bits: int, multiplier: int = MULTIPLIER) -> torch.Tensor:
    """The ``bits``-bit slot of each id: the top bits of ``id * multiplier`` (wrapping int64)."""
    mixed = ids * multiplier
    return (mixed >> (64 - bits)) & ((1 << bits) - 1)


class IdRowMap(nn.Module):
    """A set of (raw id, row) pairs with no two ids on one row and no id on two rows."""

    slots: torch.Tensor
    row_slots: torch.Tensor
    tombstones: torch.Tensor
    max_displacement: torch.Tensor

    def __init__(
        self, rows: int, device: torch.device | str | None = None, *, host_loops: bool = True
    ) -> None:
        """``host_loops``: on CPU, :meth:`find` and :meth:`insert` run compiled loops on views of
        the buffers (:mod:`shardrec.modules.mc_id_map_host`, same results) where numba can be
        imported; False runs the torch code every other device runs (the tests compare the
        two)."""
        super().__init__()
        if rows < 1:
            raise ValueError(f"IdRowMap needs at least one row, got {rows}")
        self.host_loops = host_loops
        # Per slot, the first claimant of an insert round on the host (not state: only the
        # claimed slots are written and then read); made on first use.
        self._claims: np.ndarray[Any, np.dtype[np.int64]] | None = None
        self.bits = max(4, (2 * rows - 1).bit_length())
        slots = 1 << self.bits
        table = torch.zeros((slots, 2), dtype=torch.int64, device=device)
        table[:, 1] = EMPTY
        self.register_buffer("slots", table)
        self.register_buffer(
            "row_slots", torch.full((rows,), EMPTY, dtype=torch.int64, device=device)
        )
        self.register_buffer("tombstones", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("max_displacement", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def num_slots(self) -> int:
        return 1 << self.bits

    @property
    def slot_ids(self) -> torch.Tensor:
        """The raw id in each slot (a view of ``slots``; meaningful where ``slot_rows >= 0``)."""
        return self.slots[:, 0]

    @property
    def slot_rows(self) -> torch.Tensor:
        """The row of each slot, -1 empty, -2 deleted (a view of ``slots``)."""
        return self.slots[:, 1]

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """The row of each id, or -1 where the id is not in the map (``ids`` int64, 1-D)."""
        kernels = self._host_kernels(ids)
        if kernels is not None:
            out, scratch = torch.empty_like(ids), torch.empty_like(ids)
            unused = scratch.numpy()[:0]
            kernels.find(
                self.slots.numpy(),
                self.bits,
                int(self.max_displacement),
                ids.numpy(),
                out.numpy(),
                scratch.numpy(),
                unused,
                unused,
                0,
                unused,
                0,
            )
            return out
        # index_select rather than ``t[index]``: measured about 5x faster for int64 gathers on CPU.
        mask = self.num_slots - 1
        pos = hash_slots(ids, self.bits)
        # Two gathers into contiguous results: one gather of (id, row) pairs measured about
        # 1.3x slower here (the comparisons then run on strided halves).
        rows = self.slot_rows.index_select(0, pos)
        hit = (self.slot_ids.index_select(0, pos) == ids) & (rows >= 0)
        found = torch.where(hit, rows, EMPTY)
        reach = int(self.max_displacement)
        # An id whose home slot is empty is absent; one whose home slot holds another id may sit
        # up to ``reach`` slots further on.
        active = (~hit & (rows != EMPTY)).nonzero().squeeze(1)
        if active.numel() == 0 or reach == 0:
            return found
        act_ids = ids.index_select(0, active).unsqueeze(1)
        pos = pos.index_select(0, active)
        # A short window first: it settles nearly every id (its own slot, or an empty slot that
        # proves it absent: an id never sits past an empty slot of its run); the rest of the
        # reach only for those it does not.
        first = 1
        while active.numel() > 0 and first <= reach:
            width = min(_SHORT_WINDOW if first == 1 else _LOOKUP_WINDOW, reach + 1 - first)
            steps = torch.arange(first, first + width, device=ids.device)
            flat = ((pos.unsqueeze(1) + steps) & mask).view(-1)
            w_rows = self.slot_rows.index_select(0, flat).view(-1, width)
            match = (self.slot_ids.index_select(0, flat).view(-1, width) == act_ids) & (w_rows >= 0)
            # At most one slot matches (ids are distinct); -1 where none does.
            row = torch.where(match, w_rows, EMPTY).amax(dim=1)
            found.index_copy_(0, active, row)
            first += width
            if first > reach:
                break
            go_on = ((row < 0) & (w_rows != EMPTY).all(dim=1)).nonzero().squeeze(1)
            active = active.index_select(0, go_on)
            act_ids = act_ids.index_select(0, go_on)
            pos = pos.index_select(0, go_on)
        return found

    def find_recording(
        self, ids: torch.Tensor, last_read: torch.Tensor, step: int, reads: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """:meth:`find` on the CPU, writing a training step's read records in the same pass:
        ``last_read[row] = step`` for every row found and, with ``reads``, one more read in
        ``reads[row]``. Returns (the rows, -1 where absent; the rows found, in batch order with
        repeats; the positions of the ids not found), or None where the compiled kernels do not
        run (the caller then finds and records on its own)."""
        kernels = self._host_kernels(ids)
        if kernels is None or last_read.device.type != "cpu":
            return None
        out = torch.empty_like(ids)
        hit_rows = torch.empty_like(ids)
        miss_at = torch.empty_like(ids)
        hits, misses = kernels.find(
            self.slots.numpy(),
            self.bits,
            int(self.max_displacement),
            ids.numpy(),
            out.numpy(),
            hit_rows.numpy(),
            miss_at.numpy(),
            last_read.numpy(),
            step,
            last_read.numpy() if reads is None else reads.numpy(),
            1 if reads is None else 2,
        )
        return out, hit_rows[:hits], miss_at[:misses]

    def insert(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Add ``ids[i] -> rows[i]``; the ids must be distinct and absent, the rows free."""
        if ids.numel() == 0:
            return
        kernels = self._host_kernels(ids)
        if kernels is not None:
            farthest, reused = kernels.insert(
                self.slots.numpy(),
                self.row_slots.numpy(),
                self.bits,
                ids.numpy(),
                rows.numpy(),
                int(self.max_displacement),
                self._claim_scratch(),
            )
            self.tombstones.sub_(reused)
            self.max_displacement.fill_(farthest)
            return
        mask = self.num_slots - 1
        home = hash_slots(ids, self.bits)
        steps = torch.arange(INSERT_WINDOW, device=ids.device)
        farthest = int(self.max_displacement)
        # The ids still to place (None: all of them, in order: the first pass, usually the
        # only one) and how far each resumes its walk from home.
        pending: torch.Tensor | None = None
        offset: torch.Tensor | None = None
        start = home
        while True:
            window = (start.unsqueeze(1) + steps) & mask
            is_open = (self.slot_rows.index_select(0, window.view(-1)) < 0).view(window.shape)
            first = is_open.to(torch.uint8).argmax(dim=1, keepdim=True)
            has_open = is_open.any(dim=1)
            cand = has_open.nonzero().squeeze(1)
            count = ids.numel() if pending is None else pending.numel()
            winners: torch.Tensor | None = None
            if cand.numel() > 0:
                # Several ids may reach the same open slot: the first of them in ``pending``
                # order takes it (a deterministic choice), the others walk on. A stable sort of
                # the claimed slots puts each slot's first claimant first: it touches only these
                # few numbers (a scatter into a slot-sized scratch missed the cache per claim).
                cand_pos = window.gather(1, first).squeeze(1).index_select(0, cand)
                order = torch.argsort(cand_pos, stable=True)
                by_slot = cand_pos.index_select(0, order)
                first_claim = torch.ones_like(by_slot, dtype=torch.bool)
                first_claim[1:] = by_slot[1:] != by_slot[:-1]
                at = order.masked_select(first_claim).sort().values
                winners = cand.index_select(0, at)
                slots = cand_pos.index_select(0, at)
                # In place: ``-=`` on a buffer goes through nn.Module.__setattr__ (tens of µs).
                self.tombstones.sub_((self.slot_rows.index_select(0, slots) == DELETED).sum())
                who = winners if pending is None else pending.index_select(0, winners)
                won_rows = rows.index_select(0, who)
                self.slot_ids.index_copy_(0, slots, ids.index_select(0, who))
                self.slot_rows.index_copy_(0, slots, won_rows)
                self.row_slots.index_copy_(0, won_rows, slots)
                moved = (slots - home.index_select(0, who)) & mask
                farthest = max(farthest, int(moved.max()))
                if winners.numel() == count:
                    break  # every id placed (the usual case: new ids rarely race for a slot)
            # Where an id's window has no open slot it resumes after the window, else right
            # after its first open slot (taken by another id: it did not win it).
            walked = torch.where(has_open, first.squeeze(1) + 1, INSERT_WINDOW)
            offset = walked if offset is None else offset + walked
            if winners is not None:
                lost = torch.ones(count, dtype=torch.bool, device=ids.device)
                lost.index_fill_(0, winners, False)
                keep = lost.nonzero().squeeze(1)
                pending = keep if pending is None else pending.index_select(0, keep)
                offset = offset.index_select(0, keep)
            elif pending is None:
                pending = torch.arange(count, device=ids.device)
            if pending.numel() <= _FEW and ids.device.type == "cpu":
                farthest = self._place_few(ids, rows, home, pending, offset, farthest)
                break
            start = home.index_select(0, pending) + offset
        self.max_displacement.fill_(farthest)

    def _claim_scratch(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        if self._claims is None or self._claims.shape[0] != self.num_slots:
            self._claims = np.empty(self.num_slots, dtype=np.int64)
        return self._claims

    def compiled(self) -> HostKernels | None:
        """The compiled CPU kernels, where this map runs them (on the CPU, ``host_loops``); the
        managed module picks its eviction victims with them too."""
        on_host = self.host_loops and self.slots.device.type == "cpu"
        return host_kernels() if on_host else None

    def _host_kernels(self, ids: torch.Tensor) -> HostKernels | None:
        """:meth:`compiled`, where ``ids`` are on the CPU too."""
        return self.compiled() if ids.device.type == "cpu" else None

    def _place_few(
        self,
        ids: torch.Tensor,
        rows: torch.Tensor,
        home: torch.Tensor,
        pending: torch.Tensor,
        offset: torch.Tensor,
        farthest: int,
    ) -> int:
        """:meth:`insert`'s passes for the few ids left after a race, one slot read at a time
        (CPU): the same rounds and the same winners, without a pass's two dozen torch calls.
        Returns the new farthest displacement."""
        slots = self.slots.numpy()
        row_slots = self.row_slots.numpy()
        mask = self.num_slots - 1
        todo = [
            (i, int(home[i]), off, int(ids[i]), int(rows[i]))
            for i, off in zip(pending.tolist(), offset.tolist(), strict=True)
        ]
        filled = 0
        while todo:
            # One round: every id finds the first open slot of its window (the table as it was
            # before the round); the first id in pending order to reach a slot takes it.
            claims: dict[int, tuple[int, int, int]] = {}
            later = []
            for i, start, off, raw, row in todo:
                for step in range(INSERT_WINDOW):
                    slot = (start + off + step) & mask
                    if slots[slot, 1] < 0:
                        if slot in claims:
                            later.append((i, start, off + step + 1, raw, row))
                        else:
                            claims[slot] = (start, raw, row)
                        break
                else:
                    later.append((i, start, off + INSERT_WINDOW, raw, row))
            for slot, (start, raw, row) in claims.items():
                filled += int(slots[slot, 1] == DELETED)
                slots[slot, 0] = raw
                slots[slot, 1] = row
                row_slots[row] = slot
                farthest = max(farthest, (slot - start) & mask)
            todo = later
        self.tombstones.sub_(filled)
        return farthest

    def remove_rows(self, rows: torch.Tensor) -> None:
        """Drop the ids held by ``rows`` (occupied rows, distinct); the rows become free."""
        if rows.numel() == 0:
            return
        if self._host_kernels(rows) is not None:
            row_slots, at = self.row_slots.numpy(), rows.numpy()
            self.slots.numpy()[row_slots[at], 1] = DELETED
            row_slots[at] = EMPTY
        else:
            slots = self.row_slots.index_select(0, rows)
            self.slot_rows.index_fill_(0, slots, DELETED)
            self.row_slots.index_fill_(0, rows, EMPTY)
        self.tombstones.add_(rows.numel())
        if int(self.tombstones) * 4 > self.num_slots:
            self.rebuild()

    def rebuild(self) -> None:
        """Re-insert every held id into clean slots (drops the tombstones).

        Into an empty table, ids taken in order of home slot land where linear probing would put
        them one by one: ``slot[i] = max(home[i], slot[i-1] + 1)``, that is
        ``cummax(home - i) + i``, one scan for the whole table. The few ids pushed past the last
        slot wrap around through :meth:`insert`.
        """
        kernels = self.compiled()
        if kernels is not None:
            wrapped_ids, wrapped_rows = (
                torch.empty_like(self.row_slots),
                torch.empty_like(self.row_slots),
            )
            farthest, wrapped = kernels.rebuild(
                self.slots.numpy(),
                self.row_slots.numpy(),
                self.bits,
                wrapped_ids.numpy(),
                wrapped_rows.numpy(),
            )
            self.tombstones.zero_()
            self.max_displacement.fill_(farthest)
            if wrapped > 0:
                self.insert(wrapped_ids[:wrapped], wrapped_rows[:wrapped])
            return
        held = (self.slot_rows >= 0).nonzero().squeeze(1)
        ids = self.slot_ids.index_select(0, held)
        rows = self.slot_rows.index_select(0, held)
        # Order by (home slot, row), so the layout depends on the held pairs only.
        by_row = torch.argsort(rows)
        ids, rows = ids.index_select(0, by_row), rows.index_select(0, by_row)
        home = hash_slots(ids, self.bits)
        by_home = torch.argsort(home, stable=True)
        ids, rows, home = (t.index_select(0, by_home) for t in (ids, rows, home))
        rank = torch.arange(ids.numel(), device=ids.device)
        slots = torch.cummax(home - rank, dim=0).values + rank
        fits = (slots < self.num_slots).nonzero().squeeze(1)
        wraps = (slots >= self.num_slots).nonzero().squeeze(1)
        self.slot_rows.fill_(EMPTY)
        self.tombstones.zero_()
        placed = slots.index_select(0, fits)
        placed_rows = rows.index_select(0, fits)
        self.slot_ids.index_copy_(0, placed, ids.index_select(0, fits))
        self.slot_rows.index_copy_(0, placed, placed_rows)
        self.row_slots.index_copy_(0, placed_rows, placed)
        moved = placed - home.index_select(0, fits)
        self.max_displacement.fill_(int(moved.max()) if moved.numel() > 0 else 0)
        if wraps.numel() > 0:
            self.insert(ids.index_select(0, wraps), rows.index_select(0, wraps))

    def held_ids(self) -> torch.Tensor:
        """The raw id of each row (meaningful where :meth:`occupied` is true)."""
        out = torch.zeros_like(self.row_slots)
        used = (self.row_slots >= 0).nonzero().squeeze(1)
        slots = self.row_slots.index_select(0, used)
        out.index_copy_(0, used, self.slot_ids.index_select(0, slots))
        return out

    def occupied(self) -> torch.Tensor:
        """Per row: True where an id holds it."""
        return self.row_slots >= 0

    def extra_repr(self) -> str:
        return f"rows={self.row_slots.numel()}, slots={self.num_slots}"
