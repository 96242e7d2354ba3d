"""``MCHManagedCollisionModule``: one table's raw ids mapped to rows without collisions.

::

    zch_size = 5, eviction_interval = 3: rows 0..3 for ids, row 4 the default row
    step 1   raw ids   9137702141, 42, 9137702141, -7, 555
             rows      3,          1,  3,          0,  2     new ids take free rows in id order
    step 2   raw ids   42, 8
             rows      1,  4     table full, no eviction run at step 2: 8 reads the default row

The module owns ``zch_size - 1`` rows for ids (its capacity) and reserves the last row,
``zch_size - 1``, as the *default row*: every id without a row of its own reads it (ids not yet
admitted, ids rejected by a full table, unknown ids in eval mode). No two ids held by the module
share a row. A training step (``forward`` in training mode), vectorised over the batch:

1. look the ids up in the id map (:class:`~shardrec.modules.mc_id_map.IdRowMap`); each row read
   records the step (and, if the policy counts reads, one more read);
2. the distinct ids without a row pass admission (every id, or :class:`CountThresholdAdmission`);
3. every ``eviction_interval`` steps the policy frees rows (:mod:`shardrec.modules.mc_policies`);
   rows the batch reads are never evicted by it;
4. admitted ids take free rows, lowest row first, the ids seen most often in the batch first;
   those that find none read the default row and are counted as rejected.

Rows freed by eviction are listed by :meth:`evict` so that the embedding module resets their
weights and optimizer state before the batch's lookup. In eval mode ``forward`` only looks up.
All state (id map, per-row activity, free rows, sketch, counters) is in buffers, so a checkpoint of
the model holds it and a loaded module continues exactly where the saved one stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import nn

from shardrec.modules.mc_admission import CountMinSketch, CountThresholdAdmission
from shardrec.modules.mc_counters import (
    ADMITTED,
    BELOW,
    DEMAND,
    EVICTED,
    FREE,
    REJECTED,
    STEP,
    empty_counters,
)
from shardrec.modules.mc_id_map import IdRowMap
from shardrec.modules.mc_policies import (
    EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    require_int,
)

__all__ = ["MCHManagedCollisionModule", "ManagedTableStats"]

logger = logging.getLogger(__name__)

_NEVER: Final = 2**63 - 1  # eviction key of a row that must not be evicted
# Last read and read count of a free row: above any real score, so no policy picks it.
_FREE_MARK: Final = 2**62


# A scan keeps this many times the rows it needs as candidates for the next eviction runs.
_SPARE_FACTOR: Final = 8


@dataclass(slots=True)
class _Candidates:
    """Rows kept by the last eviction scan beyond the ones it took, in (score, row) order, with
    the score each had then; ``cutoff``: no row outside them had a lower key then."""

    rows: torch.Tensor
    scores: torch.Tensor
    cutoff: int


@dataclass(frozen=True, slots=True)
class ManagedTableStats:
    """Counters of one managed table (training lookups only; ``*_total`` since creation).

    ``rejected_total`` counts lookups of admitted ids that found the table full and read the
    default row: if it grows, the table is too small or eviction too rare.
    ``below_threshold_total`` counts lookups of ids not yet admitted (they read the default row).
    """

    capacity: int
    occupancy: int
    steps: int
    admitted_total: int
    evicted_total: int
    rejected_total: int
    below_threshold_total: int

    @property
    def open_slots(self) -> int:
        return self.capacity - self.occupancy

    def as_metrics(self) -> dict[str, float]:
        """The counters as named numbers (for a metrics logger such as TensorBoard)."""
        return {
            "occupancy": float(self.occupancy),
            "occupancy_fraction": self.occupancy / self.capacity,
            "admitted_total": float(self.admitted_total),
            "evicted_total": float(self.evicted_total),
            "rejected_total": float(self.rejected_total),
            "below_threshold_total": float(self.below_threshold_total),
        }


class MCHManagedCollisionModule(nn.Module):
    """Maps raw ids to the rows of a table of ``zch_size`` rows (TorchRec's name and arguments).

    ``zch_size`` must equal the table's ``num_embeddings``; ``eviction_policy`` defaults to LRU,
    ``eviction_interval`` (training steps between eviction runs) to 1. ``admission`` None admits
    every id on first sight. ``forward(ids) -> rows`` takes and returns 1-D int64 tensors.
    """

    _counters: torch.Tensor
    _last_read: torch.Tensor
    _reads: torch.Tensor
    _free_rows: torch.Tensor

    def __init__(
        self,
        zch_size: int,
        device: torch.device | str | None = None,
        eviction_policy: EvictionPolicy | None = None,
        eviction_interval: int = 1,
        *,
        admission: CountThresholdAdmission | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        where = f"MCHManagedCollisionModule {name!r}" if name else "MCHManagedCollisionModule"
        require_int(zch_size, 2, f"{where}: zch_size (the last row is the default row)")
        require_int(eviction_interval, 1, f"{where}: eviction_interval")
        policy = eviction_policy if eviction_policy is not None else LRU_EvictionPolicy()
        if not isinstance(policy, EvictionPolicy):
            raise TypeError(f"{where}: eviction_policy must be an EvictionPolicy, got {policy!r}")
        if admission is not None and not isinstance(admission, CountThresholdAdmission):
            raise TypeError(
                f"{where}: admission must be a CountThresholdAdmission or None, got {admission!r}"
            )
        self._name = name
        self._zch_size = zch_size
        self._eviction_policy = policy
        self._eviction_interval = eviction_interval
        self._admission = admission
        capacity = zch_size - 1
        self._map = IdRowMap(capacity, device=device)
        self._sketch: CountMinSketch | None = None
        if admission is not None and admission.threshold > 1:
            self._sketch = CountMinSketch(
                admission.sketch_bits(capacity), admission.depth, device=device
            )
        for buffer in ("_last_read", "_reads"):
            self.register_buffer(
                buffer, torch.full((capacity,), _FREE_MARK, dtype=torch.int64, device=device)
            )
        # A stack of free rows: the top (the end of the used part) is popped first.
        self.register_buffer(
            "_free_rows", torch.arange(capacity - 1, -1, -1, dtype=torch.int64, device=device)
        )
        self.register_buffer("_counters", empty_counters(capacity, device))
        self._pending_resets: list[torch.Tensor] = []
        self._warned_full = False
        self._candidates: _Candidates | None = None

    def empty_like(
        self,
        zch_size: int | None = None,
        *,
        device: torch.device | str | None = None,
        name: str | None = None,
    ) -> MCHManagedCollisionModule:
        """A new, empty module with this one's policy, interval, admission and choice of the id
        map's code; ``zch_size``, ``device`` and ``name`` default to this one's (its device: that
        of its state). Nothing of this module's state is read, so it may be on the meta device."""
        fresh = MCHManagedCollisionModule(
            self._zch_size if zch_size is None else zch_size,
            device=self._counters.device if device is None else device,
            eviction_policy=self._eviction_policy,
            eviction_interval=self._eviction_interval,
            admission=self._admission,
            name=self._name if name is None else name,
        )
        fresh._map.host_loops = self._map.host_loops
        return fresh

    # ---- TorchRec's queries -----------------------------------------------------------------

    def output_size(self) -> int:
        """Rows of the table this module maps into (``zch_size``)."""
        return self._zch_size

    @property
    def capacity(self) -> int:
        """Rows ids can hold: ``zch_size - 1``."""
        return self._zch_size - 1

    @property
    def default_row(self) -> int:
        """The row read by every id that holds none: the last row, ``zch_size - 1``."""
        return self._zch_size - 1

    @property
    def eviction_policy(self) -> EvictionPolicy:
        return self._eviction_policy

    @property
    def eviction_interval(self) -> int:
        return self._eviction_interval

    @property
    def admission(self) -> CountThresholdAdmission | None:
        return self._admission

    def open_slots(self) -> int:
        """Rows no id holds."""
        return int(self._counters[FREE])

    def stats(self) -> ManagedTableStats:
        c = self._counters.tolist()
        return ManagedTableStats(
            capacity=self.capacity,
            occupancy=self.capacity - c[FREE],
            steps=c[STEP],
            admitted_total=c[ADMITTED],
            evicted_total=c[EVICTED],
            rejected_total=c[REJECTED],
            below_threshold_total=c[BELOW],
        )

    def held_ids(self) -> dict[int, int]:
        """``{raw id: row}`` of every id holding a row (for inspection and tests; reads it all)."""
        used = self._map.occupied().nonzero().squeeze(1)
        ids = self._map.held_ids().index_select(0, used)
        return dict(zip(ids.tolist(), used.tolist(), strict=True))

    # ---- remapping ----------------------------------------------------------------------------

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` without changing any state (unknown ids read the default row)."""
        rows = self._map.find(self._check_ids(ids))
        return torch.where(rows >= 0, rows, self.default_row)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids``; when training also record reads, admit, evict (see the module doc)."""
        if not self.training:
            return self.remap(ids)
        ids = self._check_ids(ids)
        with torch.no_grad():
            return self._train_step(ids)

    def evict(self) -> torch.Tensor | None:
        """Rows evicted since the last call (distinct, int64), or None: their weights and
        optimizer state must be reset before the next lookup (the embedding modules do it)."""
        if not self._pending_resets:
            return None
        rows = self._pending_resets
        self._pending_resets = []
        return rows[0] if len(rows) == 1 else torch.unique(torch.cat(rows))

    def _check_ids(self, ids: object) -> torch.Tensor:
        if self._counters.is_meta:
            raise RuntimeError(
                f"{self._where()}: its id map is on the meta device (built for planning or to be"
                " sharded): it holds no ids; shard the model with DistributedModelParallel, which"
                " builds each bucket on the rank that owns it, or build the module on a real device"
            )
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"{self._where()}: ids must be a 1-D tensor, got {ids!r}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{self._where()}: ids must be int64 or int32, got {ids.dtype}")
        return ids.to(torch.int64)

    def _where(self) -> str:
        return f"managed table {self._name!r}" if self._name else "MCHManagedCollisionModule"

    def _train_step(self, ids: torch.Tensor) -> torch.Tensor:
        c = self._counters.tolist()
        step = c[STEP] + 1
        c[STEP] = step
        counts_reads = self._eviction_policy.counts_reads
        found = self._map.find_recording(
            ids, self._last_read, step, self._reads if counts_reads else None
        )
        if found is None:
            rows = self._map.find(ids)
            hit_rows, miss_at = self._record_reads(rows, step)
        else:
            rows, hit_rows, miss_at = found
        uniq = inverse = counts = None
        # The distinct missing ids (indices into ``uniq``) that may take rows; None: all of them.
        chosen: torch.Tensor | None = None
        demand = 0
        if miss_at.numel() > 0:
            uniq, inverse, counts = torch.unique(
                ids.index_select(0, miss_at), return_inverse=True, return_counts=True
            )
            demand = uniq.numel()
            if self._sketch is not None and self._admission is not None:
                seen = self._sketch.add(uniq, counts)
                admitted = seen >= self._admission.threshold
                c[BELOW] += int(counts.masked_fill(admitted, 0).sum())
                chosen = admitted.nonzero().squeeze(1)
                demand = chosen.numel()
        c[DEMAND] += demand
        if step % self._eviction_interval == 0:
            self._run_eviction(c, step, hit_rows)
        if miss_at.numel() == 0:
            self._store_counters(c)
            return rows
        assert uniq is not None
        assert inverse is not None
        assert counts is not None
        take = min(demand, c[FREE])
        if take < demand:
            # The ids seen most often in this batch first; ties in id order (unique sorts them).
            wanted = counts if chosen is None else counts.index_select(0, chosen)
            order = torch.argsort(wanted, descending=True, stable=True)
            chosen = order if chosen is None else chosen.index_select(0, order)
            c[REJECTED] += int(counts.index_select(0, chosen[take:]).sum())
            chosen = chosen[:take]
            self._warn_full()
        if take > 0:
            top = c[FREE]
            new_rows = self._free_rows[top - take : top].flip(0)
            c[FREE] = top - take
            c[ADMITTED] += take
            self._map.insert(uniq if chosen is None else uniq.index_select(0, chosen), new_rows)
            self._last_read.index_fill_(0, new_rows, step)
            new_counts = counts if chosen is None else counts.index_select(0, chosen)
            self._reads.index_copy_(0, new_rows, new_counts)
            self._note_new_rows(new_rows, step)
            # ``chosen`` None: every distinct missing id took a row (``flip`` made a copy).
            uniq_rows = (
                new_rows
                if chosen is None
                else torch.full_like(uniq, self.default_row).index_copy_(0, chosen, new_rows)
            )
        else:
            uniq_rows = torch.full_like(uniq, self.default_row)
        rows.index_copy_(0, miss_at, uniq_rows.index_select(0, inverse))
        self._store_counters(c)
        return rows

    def _store_counters(self, c: list[int]) -> None:
        if self._counters.device.type == "cpu":
            self._counters.numpy()[:] = c
        else:
            self._counters.copy_(torch.tensor(c))

    def _record_reads(self, rows: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Record ``step`` (and one more read, if the policy counts them) on every row in
        ``rows``; returns those rows (batch order, repeats kept) and the positions of the ids
        without a row (-1). (On CPU the map's lookup writes these records itself.)"""
        held = rows >= 0
        hit_rows = rows.masked_select(held)
        self._last_read.index_fill_(0, hit_rows, step)
        all_held = hit_rows.numel() == rows.numel()
        miss_at = hit_rows[:0] if all_held else (~held).nonzero().squeeze(1)
        if self._eviction_policy.counts_reads:
            self._reads.index_add_(0, hit_rows, torch.ones_like(hit_rows))
        return hit_rows, miss_at

    def _run_eviction(self, c: list[int], step: int, hit_rows: torch.Tensor) -> None:
        policy = self._eviction_policy
        expired = policy.expired(self._last_read, step)
        victims: torch.Tensor | None = None
        if expired is not None:
            victims = expired.nonzero().squeeze(1)  # free rows carry _FREE_MARK: never expired
        if policy.makes_room:
            need = min(c[DEMAND], self.capacity) - c[FREE]
            if need > 0:
                if victims is None:
                    need = min(need, self.capacity - c[FREE])
                    victims = self._lowest_rows(need, hit_rows) if need > 0 else None
                else:
                    need = min(need - victims.numel(), self.capacity - c[FREE])
                    if need > 0:
                        extra = self._scan_lowest(need, hit_rows, victims)
                        victims = torch.cat([victims, extra]).sort().values
        c[DEMAND] = 0
        if victims is None or victims.numel() == 0:
            return
        self._map.remove_rows(victims)
        n = victims.numel()
        top = c[FREE]
        # Push in reverse so that the lowest evicted row is popped first (victims come in row
        # order).
        self._free_rows[top : top + n] = victims.flip(0)
        c[FREE] = top + n
        c[EVICTED] += n
        self._last_read.index_fill_(0, victims, _FREE_MARK)
        self._reads.index_fill_(0, victims, _FREE_MARK)
        self._pending_resets.append(victims)

    def _lowest_rows(self, need: int, hit_rows: torch.Tensor) -> torch.Tensor:
        """The ``need`` held rows of lowest key (score, then row) that this batch does not read,
        fewer if fewer are held, in row order.

        A scan keeps spare candidates: the rows after its picks in key order, each with its
        score then, and the key where it stopped (the cutoff). LRU and LFU scores only grow, and
        every read changes them (a read row is no longer a valid candidate), so a row outside the
        candidates stays above the cutoff unless it is a new id's row that starts below it (then
        the candidates are dropped, :meth:`_note_new_rows`): the lowest valid candidates are the
        lowest rows of the table, and most eviction runs need no scan. Loading or moving the
        state drops them too. On the CPU with the compiled kernels every run scans instead (one
        compiled pass over the rows cost less than checking the candidates in torch calls);
        the victims are the same.
        """
        if self._map.compiled() is not None:
            return self._scan_lowest(need, hit_rows, None)
        kept = self._candidates
        self._candidates = None
        if kept is not None and kept.rows.device == self._last_read.device:
            capacity = self.capacity
            limit = self._score_limit
            score = self._eviction_policy.score(self._last_read, self._reads)
            now = score.index_select(0, kept.rows).clamp(max=limit)
            same = now == kept.scores
            valid = same.nonzero().squeeze(1)
            if valid.numel() >= need:
                # Valid candidates are not read by this batch (their score would have changed)
                # and are in key order: the first ones are the lowest, unless a candidate read
                # since the scan is still at or below the cutoff (LFU: one more read may leave
                # it there, and once dropped from the candidates it would be passed over for
                # higher ones; an LRU read goes above every key the scan saw).
                if isinstance(self._eviction_policy, LRU_EvictionPolicy):
                    below = False
                else:
                    moved = (now * capacity + kept.rows).masked_select(~same)
                    below = moved.numel() > 0 and int(moved.min()) <= kept.cutoff
                if not below:
                    rest = valid[need:]
                    chosen = kept.rows.index_select(0, valid[:need])
                    kept.rows = kept.rows.index_select(0, rest)
                    kept.scores = kept.scores.index_select(0, rest)
                    self._candidates = kept
                    return chosen.sort().values
        if isinstance(self._eviction_policy, LRU_EvictionPolicy | LFU_EvictionPolicy):
            capacity = self.capacity
            key, limit = self._keys(None)
            k = min(capacity, max(need * _SPARE_FACTOR, capacity // 64))
            lowest = torch.topk(key, k, largest=False, sorted=True).values
            lowest = lowest.masked_select(lowest < limit * capacity)
            rows = lowest % capacity
            is_hit = torch.zeros(capacity, dtype=torch.bool, device=rows.device)
            is_hit.index_fill_(0, hit_rows, True)
            free_of_batch = (~is_hit.index_select(0, rows)).nonzero().squeeze(1)
            complete = lowest.numel() < k
            if free_of_batch.numel() >= need or complete:
                picks = free_of_batch[:need]
                spare = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
                spare.index_fill_(0, picks, False)
                at = spare.nonzero().squeeze(1)
                self._candidates = _Candidates(
                    rows=rows.index_select(0, at),
                    scores=lowest.index_select(0, at) // capacity,
                    cutoff=_NEVER if complete else int(lowest[-1]),
                )
                return rows.index_select(0, picks).sort().values
        return self._scan_lowest(need, hit_rows, None)

    @property
    def _score_limit(self) -> int:
        """Scores from here on are free rows' (``_FREE_MARK``, clamped to it) and never picked;
        keys ``score * capacity + row`` below it fit in an int64."""
        return _FREE_MARK // self.capacity

    def _keys(self, exclude: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Per row the key ``score * capacity + row`` (``exclude`` rows _NEVER), and ``limit``:
        keys from ``limit * capacity`` on are free rows, never picked."""
        capacity = self.capacity
        # Unique keys (score, then row) so the choice is a pure function of the state. Free rows
        # (their score is _FREE_MARK, clamped to ``limit``) sort last; picks among them are
        # dropped. A real score would only reach ``limit`` after about 2^62 / capacity reads
        # or steps.
        limit = self._score_limit
        score = self._eviction_policy.score(self._last_read, self._reads).clamp(max=limit)
        key = score * capacity + torch.arange(capacity, device=score.device)
        if exclude is not None:
            key.index_fill_(0, exclude, _NEVER)
        return key, limit

    def _scan_lowest(
        self, need: int, hit_rows: torch.Tensor, exclude: torch.Tensor | None
    ) -> torch.Tensor:
        """The ``need`` held rows of lowest key outside ``hit_rows`` and ``exclude`` (fewer if
        fewer are held), in row order: one full scan."""
        self._candidates = None
        outside = hit_rows if exclude is None else torch.cat([hit_rows, exclude])
        kernels = self._map.compiled()
        if kernels is not None and outside.device.type == "cpu":
            limit = self._score_limit
            score = self._eviction_policy.score(self._last_read, self._reads).contiguous()
            out = torch.empty(need, dtype=torch.int64)
            taken = kernels.lowest(score.numpy(), limit, outside.numpy(), need, out.numpy())
            return out[:taken]
        key, limit = self._keys(outside)
        lowest = torch.topk(key, need, largest=False, sorted=False).values
        lowest = lowest.masked_select(lowest < limit * self.capacity)
        return (lowest % self.capacity).sort().values

    def _note_new_rows(self, new_rows: torch.Tensor, step: int) -> None:
        """Drop the kept candidates if a new row's key is below their cutoff (see
        :meth:`_lowest_rows`)."""
        kept = self._candidates
        if kept is None:
            return
        lru = isinstance(self._eviction_policy, LRU_EvictionPolicy)
        if lru and kept.cutoff < step * self.capacity:
            # New rows were read at ``step``: their LRU keys start at step * capacity.
            return
        score = self._eviction_policy.score(self._last_read, self._reads).index_select(0, new_rows)
        if bool((score * self.capacity + new_rows < kept.cutoff).any()):
            self._candidates = None

    def state_loaded(self) -> None:
        """A checkpoint load wrote new state in place (``checkpoint.StateLoaded``): the kept
        eviction candidates describe the old state."""
        self._candidates = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.state_loaded()
        super()._load_from_state_dict(*args, **kwargs)

    def _warn_full(self) -> None:
        if not self._warned_full:
            self._warned_full = True
            logger.warning(
                "%s is full: admitted ids read the default row (row %d) and are counted in"
                " stats().rejected_total; enlarge the table or run eviction more often",
                self._where(),
                self.default_row,
            )

    def extra_repr(self) -> str:
        admission = f", admission threshold {self._admission.threshold}" if self._admission else ""
        return (
            f"zch_size={self._zch_size}, policy={self._eviction_policy},"
            f" eviction_interval={self._eviction_interval}{admission}"
        )
